"""The planner: settings left to the machine, the recommended batch and `--batch_size auto`,
the lever named in the report, the advice after an out-of-memory, `--memory_budget_gb`, and
the predictor's per-rank arithmetic under FSDP2 against the real shards."""

import json
import math
import re

import pytest
import torch

import train
from neuromanifold_gpt import build_model, planner
from neuromanifold_gpt.config.base import TrainConfig
from neuromanifold_gpt.config.cli import parse_args
from neuromanifold_gpt.distributed import DistInfo
from neuromanifold_gpt.planner import (
    HEADROOM,
    LEAN_MIN_VOCAB,
    PLANS,
    largest_batch,
    make_plan,
    oom_advice,
)
from neuromanifold_gpt.predictor import GIB, predict
from tests.conftest import one_line_error, plan_of

GPT2_VOCAB = 50257


def gpt2(**kw):
    """GPT-2 124M at 12 x 1024 on a CUDA device, compiled, as a plan."""
    return plan_of(TrainConfig.from_flags(preset="gpt2", batch_size=12, block_size=1024, compile=True,
                                          **kw), GPT2_VOCAB, "cuda")


def cuda_plan(cfg, free_gb, device_gb):
    return make_plan(cfg, GPT2_VOCAB, torch.device("cuda"), torch.bfloat16, DistInfo(), free_gb, device_gb)


def test_left_to_the_machine_compile_and_lean_loss_follow_device_and_size():
    def auto(preset, device, vocab, **kw):
        plan = plan_of(TrainConfig.from_flags(preset=preset, **kw), vocab, device)
        return plan.compile, plan.levers.lean_loss

    assert auto("gpt2", "cuda", GPT2_VOCAB) == (True, True)  # the logits outweigh the rest
    assert auto("gpt2", "cuda", GPT2_VOCAB, lean_loss=False) == (True, False)
    assert auto("gpt2", "cuda", LEAN_MIN_VOCAB - 1) == (True, False)
    assert auto("gpt2", "cuda", LEAN_MIN_VOCAB) == (True, True)
    cfg = TrainConfig.from_flags(preset="gpt2")
    assert cuda_plan(cfg, 139.3, 139.8)[1].lines[0] == ("compile: on (auto), block by block; memory "
                                                        "levers: lean loss (auto)")
    assert auto("shakespeare_char", "cuda", 65) == (False, False)  # eager was as fast, no logits to spare
    assert auto("gpt2", "cpu", GPT2_VOCAB) == (False, False)
    assert auto("gpt2", "cpu", GPT2_VOCAB, lean_loss=True) == (False, True)
    assert auto("gpt2", "cuda", GPT2_VOCAB, compile=False, lean_loss=False) == (False, False)


def test_batch_size_auto_is_read_from_the_command_line_and_config_files(tmp_path, capsys):
    assert parse_args(["--batch_size", "auto"]).data.batch_size == "auto"
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text('batch_size = "auto"\n')
    assert parse_args(["--config", str(cfg_file)]).data.batch_size == "auto"
    # until make_plan sizes it, an auto batch is the preset's, as an unset one is
    for device in ("cpu", "cuda"):
        preset_batch = TrainConfig.from_flags(preset="gpt2").resolved_batch(device)
        assert TrainConfig.from_flags(preset="gpt2", batch_size="auto").resolved_batch(device) == preset_batch
    assert train.main(["--batch_size", "many"]) == 2
    assert one_line_error(capsys).strip() == ("error: batch_size='many' on the command line is not "
                                             "valid: expected an integer or auto")
    assert train.main(["--batch_size", "auto", "--memory_budget_gb", "4"]) == 2
    assert "set one of them" in capsys.readouterr().err


def _args(data_dir, tmp_path, *extra):
    return ["--dataset", "tiny", "--data_dir", str(data_dir), "--out_dir", str(tmp_path / "out"),
            "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16",
            "--max_iters", "2", "--eval_iters", "1", "--metrics_file", str(tmp_path / "m.json"), *extra]


def test_batch_size_auto_trains_at_the_recommended_batch(data_dir, tmp_path, capsys, monkeypatch):
    free = 0.008  # GiB: a device this small makes the recommended batch a few sequences
    monkeypatch.setattr("neuromanifold_gpt.trainer.device_memory_gb", lambda device: (free, 1.0))
    assert train.main(_args(data_dir, tmp_path, "--batch_size", "auto")) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    b = m["recommended_batch_size"]
    assert m["batch_size"] == b > 1
    p = plan_of(parse_args(_args(data_dir, tmp_path)), 65)
    assert predict(p, b).peak_gb <= HEADROOM["cpu"] * free < predict(p, b + 1).peak_gb
    out = capsys.readouterr().out
    assert f"batch size: auto, so the recommended {b}" in out
    assert f"tokens per iteration will be: {b * 16:,} (1 x {b} x 16)" in out


@pytest.mark.parametrize("compile, winner", [(True, "--gradient_checkpointing true"),
                                             (False, "--lean_loss true")])  # eager: 12 bytes per logit
def test_report_names_the_lever_that_buys_the_most(compile, winner):
    cfg = TrainConfig.from_flags(preset="gpt2", batch_size=12, block_size=1024, compile=compile,
                                 lean_loss=False)
    plan, report = cuda_plan(cfg, free_gb=139.3, device_gb=139.8)
    limit = HEADROOM["cuda"] * 139.3
    lean = largest_batch(plan.replace(lean_loss=True), limit)
    block = largest_batch(plan.replace(**planner.BLOCK), limit)
    flag, best = ("--lean_loss true", lean) if lean >= block else ("--gradient_checkpointing true", block)
    assert flag == winner and best > report.recommended == largest_batch(plan, limit)
    assert report.lines[-1] == (f"recommended batch size: {report.recommended} (with {flag}: {best}) "
                                f"for 139.3 GiB free of 139.8 GiB (cuda)")
    # with every lever already on, none is named
    _, lean_block = cuda_plan(cfg.with_flags(lean_loss=True, **planner.BLOCK), 139.3, 139.8)
    assert lean_block.lever is None and "(with" not in lean_block.lines[-1]


GPT2_ARGS = ["--preset", "gpt2", "--batch_size", "12", "--block_size", "1024", "--compile", "true",
             "--lean_loss", "true"]


@pytest.mark.parametrize("asked, flags", [
    (["--gradient_checkpointing", "true", "--checkpoint_policy", "mlp"], "--checkpoint_policy block"),
    (["--checkpoint_policy", "mlp"], "--gradient_checkpointing true --checkpoint_policy block"),
    (["--checkpoint_policy", "block"], "--gradient_checkpointing true"),
    (["--gradient_checkpointing", "true", "--checkpoint_layers", "6"], "--checkpoint_layers none"),
    (["--gradient_checkpointing", "true", "--checkpoint_every", "2"], "--checkpoint_every 1"),
    (["--gradient_checkpointing", "true", "--checkpoint_policy", "mlp", "--checkpoint_layers", "6"],
     "--checkpoint_policy block --checkpoint_layers none"),
])
def test_the_block_lever_names_the_flags_whose_run_has_its_batch(asked, flags):
    """Every block checkpointed whole, named by the flags that differ from the run's; running
    with them recommends the batch the lever promised."""
    _, report = cuda_plan(parse_args(GPT2_ARGS + asked), free_gb=139.3, device_gb=139.8)
    assert report.lever[0] == flags
    followed, after = cuda_plan(parse_args(GPT2_ARGS + asked + flags.split()), 139.3, 139.8)
    assert followed.layer_policies == ["block"] * 12 and after.lever is None
    assert report.lever[1] == after.recommended > report.recommended
    assert f"(with {flags}: {after.recommended}) for 139.3 GiB free" in report.lines[-1]


@pytest.mark.parametrize("budget", [10.0, 4.0])
def test_under_a_budget_the_recommended_batch_and_lever_fit_the_budget(budget):
    cfg = TrainConfig.from_flags(preset="gpt2", batch_size=12, block_size=1024, compile=True,
                                 memory_budget_gb=budget)
    plan, report = cuda_plan(cfg, free_gb=139.3, device_gb=139.8)
    room = planner.BUDGET_MARGIN * budget
    assert report.recommended == largest_batch(plan, room) < largest_batch(plan, HEADROOM["cuda"] * 139.3)
    assert report.lever[1] == max(largest_batch(planner.settle(plan.replace(**fields)), room)
                                  for fields in planner.LEVERS)
    assert report.lines[-1] == (f"recommended batch size: {report.recommended} (with {report.lever[0]}: "
                                f"{report.lever[1]}) for memory_budget_gb={budget:g}, of 139.3 GiB "
                                f"free of 139.8 GiB (cuda)")
    # a budget past the device: the device bounds the batch, as without one
    _, device = cuda_plan(cfg.with_flags(memory_budget_gb=1000.0), 139.3, 139.8)
    assert device.lines[-1].endswith(" for 139.3 GiB free of 139.8 GiB (cuda)")


def test_out_of_memory_advice_is_the_largest_batch_predicted_to_fit():
    gpt2_cfg = TrainConfig.from_flags(preset="gpt2", batch_size=12, block_size=1024, compile=True,
                                      lean_loss=False)
    _, setup = cuda_plan(gpt2_cfg, free_gb=80.0, device_gb=80.0)
    rec = setup.recommended
    b, text = oom_advice(setup, rec + 50)
    assert b == min(rec, math.floor(HEADROOM["cuda"] * (rec + 50)))
    assert text.startswith(f"--batch_size {b} (or ")
    # the prediction said it fits, yet it ran out: a margin below what failed, not one less
    assert oom_advice(setup, rec)[0] == math.floor(HEADROOM["cuda"] * rec) < rec - 1
    _, tiny = cuda_plan(gpt2_cfg, free_gb=0.5, device_gb=80.0)
    assert oom_advice(tiny, 12) == (0, "batch_size 1 does not fit either; use a smaller model or "
                                        "block_size")


COSTS = {"hardware": "test", "step_ratio": {"none": 1.0, "selective": 1.1, "none +lean": 1.2,
                                            "mlp +lean": 1.3, "block +lean": 1.6}}


@pytest.mark.parametrize("budget", [20.0, 6.0, 5.3, 3.0])
def test_budget_picks_the_fastest_plan_predicted_to_fit(budget, monkeypatch):
    monkeypatch.setattr(planner, "load_costs", lambda: COSTS)
    label, plan, lines = planner.fastest_plan(gpt2(), budget, planner.BUDGET_MARGIN * budget)
    peaks = {lbl: predict(p).peak_gb for lbl, p, _ in planner.candidates(gpt2(), COSTS["step_ratio"])}
    assert set(peaks) == set(COSTS["step_ratio"])
    fits = [lbl for lbl in peaks if peaks[lbl] <= planner.BUDGET_MARGIN * budget]
    assert label == min(fits, key=lambda lbl: COSTS["step_ratio"][lbl])
    assert peaks[label] <= planner.BUDGET_MARGIN * budget
    # the plan is applied whole: its policy, its loss, nothing of the run's own levers left
    assert dict(PLANS)[label].items() <= planner._flags_of(plan).items()
    assert not plan.levers.offload_activations and not plan.levers.optimizer_in_backward
    assert lines == [f"memory plan for {budget:g} GiB: {label} (predicted peak {peaks[label]:.2f} GiB, "
                     f"step {COSTS['step_ratio'][label]:.2f}x the fastest plan's as measured on test)"]


def test_plans_are_ranked_by_their_measured_steps_alone(monkeypatch):
    # a plan with recompute may measure faster than the same loss without it (timing noise,
    # or a compile unit that suits it better), and is taken as measured
    measured = {"none": 1.0, "none +lean": 1.59, "block +lean": 1.32}
    monkeypatch.setattr(planner, "load_costs", lambda: dict(hardware="test", step_ratio=measured))
    label, _, lines = planner.fastest_plan(gpt2(), 20.0, 20.0)
    assert label == "none" and "step 1.00x the fastest plan's" in lines[0]
    none_lean = predict(gpt2().replace(**dict(PLANS)["none +lean"])).peak_gb
    none = predict(gpt2().replace(**dict(PLANS)["none"])).peak_gb
    assert none_lean < none  # a budget between them fits both lean plans and not the plain one
    label, _, lines = planner.fastest_plan(gpt2(), 20.0, (none + none_lean) / 2)
    assert label == "block +lean" and "step 1.32x the fastest plan's" in lines[0]


def budget_plan(budget, free_gb=139.3):
    """make_plan under memory_budget_gb=budget: the plan's label, the plan and the report."""
    cfg = TrainConfig.from_flags(preset="gpt2", batch_size=12, block_size=1024, compile=True,
                                 memory_budget_gb=budget)
    plan, report = cuda_plan(cfg, free_gb=free_gb, device_gb=139.8)
    label = next(re.match(r"memory plan for \S+ GiB: (.+?) \(", line)[1]
                 for line in report.lines if line.startswith("memory plan for "))
    return label, plan, report


def test_budget_leaves_a_margin_for_the_predictor(monkeypatch):
    monkeypatch.setattr(planner, "load_costs", lambda: COSTS)
    none = predict(gpt2().replace(**dict(PLANS)["none"])).peak_gb
    assert budget_plan(none / planner.BUDGET_MARGIN)[0] == "none"
    # predicted to fit, but closer to the budget than the predictor's error: a leaner plan
    assert budget_plan(1.02 * none)[0] != "none"


def test_a_budget_past_the_device_plans_and_sizes_the_batch_for_the_device(monkeypatch):
    """The device's share bounds both the plan and the recommended batch, as one room."""
    monkeypatch.setattr(planner, "load_costs", lambda: COSTS)
    none = predict(gpt2().replace(**dict(PLANS)["none"])).peak_gb
    free = none / (planner.BUDGET_MARGIN ** 0.5 * HEADROOM["cuda"])  # none fits the device's share
    label, plan, report = budget_plan(1000.0, free_gb=free)  # with room to spare: not the budget's
    assert label == "none" and report.recommended == largest_batch(plan, HEADROOM["cuda"] * free) >= 12
    assert report.lines[-1].endswith(f" for {free:.1f} GiB free of 139.8 GiB (cuda)")


def test_budget_that_nothing_fits_is_one_line_and_exit_2(data_dir, tmp_path, capsys):
    assert train.main(_args(data_dir, tmp_path, "--batch_size", "4", "--memory_budget_gb", "1e-5")) == 2
    assert "fits no plan at batch_size 4: the leanest, " in one_line_error(capsys)
    assert not (tmp_path / "m.json").exists()


def test_budget_plan_is_reported_and_trained(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("neuromanifold_gpt.trainer.device_memory_gb", lambda device: (2.0, 4.0))
    assert train.main(_args(data_dir, tmp_path, "--batch_size", "4", "--memory_budget_gb", "20")) == 0
    out = capsys.readouterr().out
    assert "memory budget 20 GiB is more than the device can give (1.0 GiB); planning for 1.0 GiB" in out
    assert "memory plan for 20 GiB: none (predicted peak" in out  # everything fits: the fastest
    assert json.loads((tmp_path / "m.json").read_text())["policy"] == "none"


def test_cost_table_covers_every_plan_relative_to_the_fastest():
    """The committed costs: a measured ratio for every plan the planner weighs, the fastest 1,
    and the GPU and bench run they hold for."""
    costs = planner.load_costs()
    ratios = costs["step_ratio"]
    assert set(ratios) == set(dict(PLANS)) and min(ratios.values()) == 1.0
    # from a GPU, 20 timed steps a run and at least two interleaved runs of every row, by the
    # bench as it was named when it measured them
    found = re.search(r"(?:python3 -m benchmarks\.bench|bench\.py) --steps (\d+), "
                      r"the median of (\d+)(?:-\d+)? interleaved runs a row", costs["hardware"])
    assert costs["hardware"].startswith("NVIDIA ") and found, costs["hardware"]
    assert int(found[1]) >= 20 and int(found[2]) >= 2


def test_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    planner.use_expandable_segments()
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    planner.use_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


@pytest.mark.parametrize("world", [2, 3, 4])
def test_fsdp_prediction_matches_the_real_shards(world):
    """fully_shard on a fake process group of `world` ranks: rank 0's local shards are what the
    predictor counts, 16/world bytes per parameter, plus the unsharded root and two blocks."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from neuromanifold_gpt.distributed import parallelize

    cfg = TrainConfig.from_flags(preset="gpt2", n_layer=3, n_embd=36, n_head=2, batch_size=2,
                                 block_size=16, fsdp=True, lean_loss=False,
                                 gradient_accumulation_steps=world)
    mc = cfg.model_config(200, 16)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        model = build_model(mc)
        full = {name: p.numel() for name, p in model.named_parameters()}
        parallelize(model, plan_of(cfg, 200, world=world, fsdp=True))
        local = sum(p.to_local().numel() for p in model.parameters())
    finally:
        dist.destroy_process_group()
    p = predict(plan_of(cfg, 200, world=world, fsdp=True))
    one = predict(plan_of(cfg.with_flags(fsdp=False, gradient_accumulation_steps=1), 200))
    assert local < sum(full.values()) / world + 3 * len(full)  # about 1/world, rows rounded up
    assert p.phases["optimizer step"] * GIB == 16 * local  # weights, gradients, AdamW: shards
    block = sum(v for k, v in full.items() if k.startswith("transformer.h.0."))
    root = sum(full.values()) - mc.n_layer * block
    assert p.phase != "optimizer step" and p.breakdown["optimizer"] * GIB == 8 * local
    assert p.breakdown["params"] * GIB == 4 * (local + root + 2 * block)  # shards + unsharded in flight
    assert one.phases["optimizer step"] * GIB == 16 * sum(full.values())  # one rank holds all
