"""The memory predictor: its figures against counted memory, the recommended batch size,
the startup report, the metrics, and the out-of-memory exit."""

import json
import statistics
from unittest import mock

import numpy as np
import pytest
import torch

import train
from neuromanifold_gpt import build_model, levers
from neuromanifold_gpt.config.base import TrainConfig
from neuromanifold_gpt.data import write_dataset
from neuromanifold_gpt.loss import LinearCrossEntropyLoss
from neuromanifold_gpt.optim import make_optimizer
from neuromanifold_gpt.planner import largest_batch
from neuromanifold_gpt.predictor import GIB, predict
from neuromanifold_gpt.trainer import Trainer
from tests.conftest import one_line_error, plan_of

VOCAB = 200


@pytest.mark.parametrize("preset, bias", [("gpt2", None), ("shakespeare_char", None),
                                          ("gpt2", False)])
def test_weights_gradients_and_adamw_states_are_counted_exactly(preset, bias):
    cfg = TrainConfig.from_flags(preset=preset, bias=bias)
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(cfg.model_config(VOCAB, 128)).parameters())
    p = predict(plan_of(cfg, VOCAB))
    b = p.breakdown
    assert b["params"] * GIB == 4 * n and b["optimizer"] * GIB == 8 * n
    assert p.phases["optimizer step"] * GIB == 16 * n  # weights + grads + AdamW, nothing else


def _tracked_peak_gb(cfg: TrainConfig, dtype: torch.dtype) -> float:
    """Peak of every tensor alive during one training step (after a warm-up step), counted
    tensor by tensor: on the CPU nothing else holds memory the predictor should know of."""
    from torch.distributed._tools.mem_tracker import MemTracker

    B, T = cfg.resolved_batch("cpu")
    torch.manual_seed(0)
    model = build_model(cfg.model_config(VOCAB, T), cfg.activation_checkpoint)
    if cfg.memory_levers.lean_loss:
        model.lean_loss = LinearCrossEntropyLoss()
    optimizer = make_optimizer(model, cfg.optimizer, cfg.memory_levers, torch.device("cpu"))
    x = torch.randint(0, VOCAB, (B, T))
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast, levers.forward_context(cfg.memory_levers):
            loss = model(x, x)[1]
        loss.backward()
        if cfg.optimizer.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] / GIB


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("overrides", [
    dict(),
    dict(lean_loss=True),
    dict(gradient_checkpointing=True),
    dict(gradient_checkpointing=True, checkpoint_policy="attention", lean_loss=True),
    dict(gradient_checkpointing=True, checkpoint_policy="mlp", lean_loss=True),
    dict(gradient_checkpointing=True, checkpoint_policy="selective", lean_loss=True),
    dict(gradient_checkpointing=True, lean_loss=True, optimizer_in_backward=True, grad_clip=0.0),
], ids=["plain", "lean", "block", "attention", "mlp", "selective", "in-backward"])
def test_eager_prediction_within_10_percent_of_counted_peak(overrides, dtype):
    cfg = TrainConfig.from_flags(preset="gpt2", n_layer=3, n_embd=128, n_head=4, batch_size=4,
                                 block_size=128, **overrides)
    measured = _tracked_peak_gb(cfg, dtype)
    predicted = predict(plan_of(cfg, VOCAB, dtype=dtype)).peak_gb
    assert abs(predicted / measured - 1) < 0.10, (predicted, measured)


def test_levers_lower_the_prediction_where_they_act():
    def peak(**kw):
        cfg = TrainConfig.from_flags(preset="gpt2", batch_size=12, block_size=1024, **kw)
        return predict(plan_of(cfg.with_flags(compile=True), 50257, "cuda")).peak_gb

    plain, lean = peak(lean_loss=False), peak(lean_loss=True)
    block = peak(lean_loss=True, gradient_checkpointing=True)
    budget = peak(lean_loss=True, activation_memory_budget=0.25)
    offload = peak(lean_loss=True, gradient_checkpointing=True, offload_activations=True)
    assert block < budget < lean < plain
    assert offload < block


def test_the_cuda_lean_loss_holds_one_chunk_of_logits_in_the_compute_dtype():
    """On CUDA the compiled chunk arithmetic writes the logits' gradient over them: the loss's
    phase grows by one bf16 (c, V) buffer per token of chunk, not two."""
    cfg = TrainConfig.from_flags(preset="gpt2", batch_size=12, block_size=1024, lean_loss=True,
                                 compile=True)
    loss_gib = {c: predict(plan_of(cfg.with_flags(loss_chunk_tokens=c), 50257, "cuda")).phases["loss"]
                for c in (512, 2048)}
    head_rows = cfg.model_config(50257).padded_vocab_size  # 50304
    assert (loss_gib[2048] - loss_gib[512]) * GIB == pytest.approx(2 * (2048 - 512) * head_rows)


def test_largest_batch_is_the_largest_that_fits():
    plan = plan_of(TrainConfig.from_flags(preset="gpt2", block_size=1024, compile=True, lean_loss=False),
                   50257, "cuda")
    b = largest_batch(plan, 36.0)
    assert predict(plan, b).peak_gb <= 36.0 < predict(plan, b + 1).peak_gb
    assert largest_batch(plan, 0.5) == 0  # not even one sequence


def _args(data_dir, tmp_path, *extra):
    return ["--dataset", "tiny", "--data_dir", str(data_dir), "--out_dir", str(tmp_path / "out"),
            "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--batch_size", "2",
            "--block_size", "16", "--max_iters", "2", "--eval_iters", "1",
            "--metrics_file", str(tmp_path / "metrics.json"), *extra]


def test_startup_report_and_metrics_carry_the_prediction(data_dir, tmp_path, capsys):
    assert train.main(_args(data_dir, tmp_path, "--lean_loss", "true")) == 0
    out = capsys.readouterr().out
    assert "compile: off (auto); memory levers: lean loss" in out
    assert "predicted peak memory:" in out and "recommended batch size:" in out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["predicted_peak_gb"] > 0 and m["recommended_batch_size"] > 0
    assert m["predicted/measured"] is None  # a CPU run measures the process, not tensors
    assert m["compile"] is False and m["lean_loss"] is True and m["oom"] is False


def test_cuda_out_of_memory_ends_with_one_line_exit_3_and_metrics(data_dir, tmp_path, capsys,
                                                                  monkeypatch):
    def out_of_memory(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", out_of_memory)
    trace = tmp_path / "trace.tsv"
    assert train.main(_args(data_dir, tmp_path) + ["--memory_trace_file", str(trace)]) == 3
    err = one_line_error(capsys)
    assert "GiB (predicted)" in err and "the device has" in err
    assert "--batch_size" in err
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["oom"] is True and m["batch_size"] == 2
    assert m["predicted_peak_gb"] > 0 and 0 < m["recommended_batch_size"] < m["batch_size"]
    assert trace.read_text() == "step\tloss\tpeak_memory_gb\tpeak_reserved_gb\n"  # empty, not missing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("overrides", [dict(lean_loss=False),
                                       dict(gradient_checkpointing=True, lean_loss=True),
                                       dict(gradient_checkpointing=True, checkpoint_policy="mlp",
                                            lean_loss=False)])
def test_prediction_within_10_percent_of_cuda_peak(tmp_path, overrides, compile):
    """At 32 x 512 tokens. The predictor leaves out 0.14-0.39 GiB that does not grow with the
    batch: at 8 x 512 the lean-loss cases' predicted / measured was 0.81-0.90 on the H200, at
    32 x 512 0.96-0.98. A fresh compile cache: graphs an earlier test left would count in this
    run's peak."""
    from neuromanifold_gpt.trainer import train as run

    torch._dynamo.reset()
    ids = np.random.default_rng(0).integers(0, 50257, 100_000)
    write_dataset(tmp_path / "gpt2ids", ids, dict(vocab_size=50257))
    cfg = TrainConfig.from_flags(dataset="gpt2ids", data_dir=str(tmp_path), preset="gpt2",
                                 n_layer=4, batch_size=32, block_size=512, max_iters=3,
                                 eval_iters=1, compile=compile, **overrides)
    m = run(cfg, quiet=True)
    assert abs(m["predicted/measured"] - 1) < 0.10, m["predicted/measured"]


def test_bench_quick_writes_json_table_and_plot(tmp_path):
    import bench

    assert bench.main(["--quick", "--steps", "1", "--out_dir", str(tmp_path),
                       "--only", "none,block +lean"]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    labels = [r["label"] for r in data["rows"]]
    assert labels[:2] == ["eager none", "eager none +lean"] and "eager block +lean" in labels
    base = next(r for r in data["rows"] if r["label"] == data["rows"][0]["baseline"])
    assert base["recompute"] == "none" and base["mem_vs_baseline"] == 1.0
    assert all(r["step_ms"] > 0 and r["peak_allocated_gb"] > 0 for r in data["rows"])
    assert "| eager block +lean" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0
    # the report mode rebuilds the same table from the JSON
    assert bench.main(["--report", str(tmp_path / "bench.json"), "--out_dir",
                       str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "bench.md").read_text() == (tmp_path / "bench.md").read_text()


def test_bench_runs_the_lean_rows_at_the_chunk_sizes_asked_for(tmp_path):
    import bench
    from neuromanifold_gpt import loss

    with mock.patch.object(loss, "_add_chunk_grads", wraps=loss._add_chunk_grads) as chunks:
        assert bench.main(["--quick", "--steps", "1", "--out_dir", str(tmp_path), "--only",
                           "eager none,eager none +lean", "--exact", "--loss_chunks", "8,8"]) == 0
    rows = {r["label"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert list(rows) == ["eager none", "eager none +lean", "eager none +lean (8 tokens a chunk)"]
    # 2 x 32 tokens, two steps a row (warm-up and timed): one chunk a step, then eight
    assert chunks.call_count == 2 * 1 + 2 * 8
    chunked = rows["eager none +lean (8 tokens a chunk)"]
    assert chunked["variant"] == "8 tokens a chunk" and len(chunked["step_ms_runs"]) == 1
    from neuromanifold_gpt import predictor
    with bench.variant_context("8 tokens a chunk"):  # the row's prediction counts its own chunk
        assert predictor.chunk_tokens(64, 65) == loss.chunk_tokens(64, 65) == 8
    assert predictor.chunk_tokens(64, 65) == 64
    # a chunk row can be named by itself
    assert bench.main(["--quick", "--steps", "1", "--out_dir", str(tmp_path / "named"), "--exact",
                       "--only", "eager block +lean (16 tokens a chunk)", "--loss_chunks", "16"]) == 0
    rows = json.loads((tmp_path / "named" / "bench.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["eager block +lean (16 tokens a chunk)"]


def test_plan_costs_are_the_compiled_plans_steps_over_the_fastest_with_the_runs_they_had():
    import bench

    def row(label, runs, **kw):  # merge_repeats's row: the median of the runs' steps
        return {**dict(preset="gpt2", impl="ours", label=label, oom=False, step_ms=statistics.median(runs),
                       step_ms_runs=runs, batch_size=12, block_size=1024), **kw}

    rows = [row("compiled none", [20.0, 21.0, 19.0]), row("compiled block", [30.0, 31.0]),
            row("compiled block +lean (cce)", [10.0], variant="cce"), row("eager none", [5.0]),
            row("compiled none", [9.0], preset="gpt2-medium")]
    costs = bench.plan_costs(dict(device="H100", torch_version="2.11", steps=20, repeat=3), rows, "gpt2")
    assert costs["step_ratio"] == {"none": 1.0, "block": 1.525}
    assert costs["hardware"] == ("H100, torch 2.11, bf16 autocast, compiled, gpt2 at 12 x 1024, bench.py "
                                 "--steps 20, the median of 2-3 interleaved runs a row")
    meta = dict(device="H100", torch_version="2.11", steps=20)
    once = bench.plan_costs(meta, [row("compiled none", [20.0])], "gpt2")
    assert once["hardware"].endswith("bench.py --steps 20, one run a row")


def test_budget_plans_are_compared_with_the_fastest_fitting_row_of_several_reports(tmp_path):
    """--against takes several bench.json files (one per process of a split bench): a row of a
    later file replaces the same row of an earlier one."""
    import bench

    def row(label, gb, ms):
        return dict(preset="gpt2", label=label, impl="ours", variant=None, oom=False,
                    peak_allocated_gb=gb, step_ms=ms)

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(dict(device="d", rows=[row("compiled none", 6.8, 29.0),
                                                       row("compiled block +lean", 2.4, 36.0)])))
    second.write_text(json.dumps(dict(device="d", rows=[row("compiled none", 6.8, 30.0),
                                                        row("compiled block", 3.9, 33.0)])))
    meta, rows = bench.read_reports(f"{first},{second}")
    assert meta["sources"] == [str(first), str(second)] and len(rows) == 3
    merged_file = tmp_path / "merged.json"
    merged_file.write_text(json.dumps(dict(meta, rows=rows)))
    assert bench.read_reports(str(merged_file))[0]["sources"] == [str(first), str(second)]
    other = tmp_path / "c.json"
    other.write_text(json.dumps(dict(device="e", rows=[])))
    with pytest.raises(ValueError, match="its device .* is not that of the reports before it"):
        bench.read_reports(f"{first},{other}")
    assert bench.fastest_bench_row(rows, "gpt2", 10)["step_ms"] == 30.0  # the later file's
    assert bench.fastest_bench_row(rows, "gpt2", 4)["label"] == "compiled block"
    assert bench.fastest_bench_row(rows, "gpt2", 3)["label"] == "compiled block +lean"
    assert bench.fastest_bench_row(rows, "gpt2", 2) is None


def test_bench_loss_kernels_checks_each_kernel_against_fp64(tmp_path):
    import bench

    assert bench.main(["--loss_kernels", "--quick", "--steps", "1", "--loss_chunks", "37",
                       "--out_dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "loss_kernels.json").read_text())["rows"]
    kernels = ["plain", "ours", "ours, 37 tokens a chunk"]
    speed = [r for r in rows if r["kind"] == "speed"]
    assert [r["kernel"] for r in speed] == kernels and all(r["ms"] > 0 for r in speed)
    accuracy = [r for r in rows if r["kind"] == "accuracy"]
    assert {(r["head"], r["kernel"]) for r in accuracy} == {
        (h, k) for h in ("random", "shared direction") for k in kernels}
    for r in accuracy:  # bf16 rounding, nothing more
        assert r["loss_error"] < 1e-3 and r["grad_x_error"] < 1e-2 and r["grad_w_error"] < 1e-2, r
    assert "| shared direction" in (tmp_path / "loss_kernels.md").read_text()
    if not torch.cuda.is_available():
        assert bench.main(["--loss_kernels", "--out_dir", str(tmp_path / "cuda")]) == 2
        assert not (tmp_path / "cuda").exists()


@pytest.mark.parametrize("argv, message", [
    (["--plans", "batch,sizes"], "error: --plans 'batch,sizes': name the tables batch and/or budget"),
    (["--plans", "budget", "--budgets", "3,lots"],
     "error: --budgets '3,lots': expected GiB as numbers, comma-separated"),
    (["--quick", "--exact"],
     "error: --exact matches whole labels given by --only; name the rows with --only"),
    (["--quick", "--only", "eager none", "--exact", "--profile", "eager blok"],
     "error: --profile 'eager blok' is not a row of this run; name a row that --only selects, "
     "e.g. 'eager none'"),
    (["--quick", "--profile", "eager none", "--profile_steps", "0"],
     "error: --steps, --repeat and --profile_steps must be at least 1"),
    (["--quick", "--loss_chunks", "64,0"], "error: --loss_chunks takes token counts of at least 1"),
    (["--quick", "--only", "eager none", "--exact", "--loss_chunks", "64"],
     "error: --loss_chunks adds rows of the lean plans, and --only selects none; select one, "
     "e.g. --only 'eager none +lean'"),
    (["--quick", "--only", "eager nothing", "--exact"],
     "error: --only 'eager nothing' selects no row; name rows as bench.md labels them, e.g. "
     "'eager none'"),
    (["--plans", "budget", "--loss_chunks", "64"],
     "error: --loss_chunks adds rows of the losses or of the lean plans; it does not go with "
     "--plans or --report"),
    (["--loss_kernels", "--quick", "--loss_chunks", "64,many"],
     "error: --loss_chunks '64,many': expected token counts, comma-separated"),
    (["--loss_kernels", "--quick", "--plans", "budget"],
     "error: --loss_kernels times the losses alone; it does not go with --plans, --report, "
     "--profile, --snapshot or --only"),
    (["--plans", "budget", "--profile", "eager none"],
     "error: --profile runs bench rows; it does not go with --plans or --report"),
    (["--plans", "batch", "--batch_plans", "none,blok"],
     "error: --batch_plans: unknown plan 'blok'; choose from none, block, block +lean"),
    (["--report", "out/nowhere/bench.json"],
     "error: bench report out/nowhere/bench.json is missing; run bench.py, which writes it as "
     "OUT_DIR/bench.json (--out_dir, out/bench by default)"),
])
def test_bench_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    import bench

    assert bench.main([*argv, "--out_dir", str(tmp_path / "plans")]) == 2
    assert one_line_error(capsys).strip() == message
    assert not (tmp_path / "plans").exists()  # nothing started


def test_bench_checks_the_recommended_batch_under_the_plans_asked_for(tmp_path, monkeypatch):
    """--batch_plans picks the plans a batch check trains, once each, in the order given, and
    the table has a row for each run."""
    import bench

    calls = []

    def fake_run(data_dir, preset, extra, steps, metrics):
        calls.append((preset, extra))
        return dict(preset=preset, exit=0, batch_size=8, predicted_gb=2.0, peak_gb=1.9, reserved_gb=2.1)

    monkeypatch.setattr(bench, "run_train", fake_run)
    argv = ["--plans", "batch", "--batch_presets", "shakespeare_char",
            "--batch_plans", "block +lean,none,block +lean", "--out_dir", str(tmp_path)]
    assert bench.main(argv) == 0
    assert calls == [("shakespeare_char", ["--batch_size", "auto", *bench.PLAN_POLICIES[p]])
                     for p in ("block +lean", "none")]
    rows = [line for line in (tmp_path / "plans.md").read_text().splitlines()
            if line.startswith("| shakespeare_char")]
    assert rows == ["| shakespeare_char | block +lean | 8 | 2.00 | 1.90 | +5.3 | 2.10 | yes |",
                    "| shakespeare_char | none | 8 | 2.00 | 1.90 | +5.3 | 2.10 | yes |"]


def test_compiled_coefficient_matches_what_the_partitioner_saves():
    """The compiled per-layer coefficient against a count: the bytes compile's min-cut
    partitioner hands from forward to backward for one bf16-autocast block on the CPU (the
    activations only, not the weights). Measured: 44.5 bytes per token x width against the
    predictor's 36 (CUDA-calibrated; the CPU attention also keeps its log-sum-exp)."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from neuromanifold_gpt.config.base import NeuroManifoldConfig
    from neuromanifold_gpt.predictor import _kept_per_layer

    B, T, C = 4, 64, 64
    saved = []

    def count_saved(gm, example_inputs):
        for node in gm.graph.find_nodes(op="placeholder"):
            val = node.meta.get("val")
            if not node.name.startswith("tangents") and val is not None and val.numel() >= B * T:
                saved.append(val.numel() * val.element_size())
        return gm

    backend = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=count_saved,
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    block = build_model(NeuroManifoldConfig(block_size=T, n_layer=1, n_head=4, n_embd=C)).transformer.h[0]
    block.compile(backend=backend, dynamic=False)
    x = torch.randn(B, T, C, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    y.float().sum().backward()
    counted = sum(saved) / (B * T * C)
    predicted = _kept_per_layer("none", compiled=True, a=2, dropout=False)
    assert abs(predicted / counted - 1) < 0.25, (predicted, counted)


def test_bench_profile_sorts_the_device_time_by_kernel_kind(tmp_path):
    """The profile summary from key_averages-like events, and --profile on the CPU."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    import bench

    def event(key, device_us=0.0, cpu_us=0.0, count=2, annotation=False):
        return SimpleNamespace(key=key, device_type=DeviceType.CUDA if device_us else DeviceType.CPU,
                               self_device_time_total=device_us, self_cpu_time_total=cpu_us,
                               cpu_time_total=cpu_us, count=count, is_user_annotation=annotation)

    events = [event("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", 1000.0),
              # a range around kernels listed on their own: not device work of its own
              event("Optimizer.step#AdamW.step", 700.0, count=1, annotation=True),
              event("triton_per_fused_native_layer_norm_0", 600.0, count=24),
              event("_cce_backward_kernel", 400.0), event("Torch-Compiled Region: 0/0", cpu_us=300.0),
              event("aten::mm", cpu_us=50.0)]
    text = bench.profile_summary(events, steps=2, wall_s=0.002)
    assert "step: 1.00 ms wall over 2 profiled steps" in text
    assert "device busy: 1.00 ms a step (100% of the step)" in text
    assert "| matmul (cuBLAS / CUTLASS) | 0.50 | 50.0% |" in text
    assert "| compiled (inductor's Triton) | 0.30 | 30.0% |" in text
    assert "| cut-cross-entropy | 0.20 | 20.0% |" in text
    assert "| compiled forward | 0.15 |" in text
    assert "| triton_per_fused_native_layer_norm_0 | 12 | 0.300 |" in text

    assert bench.main(["--quick", "--steps", "1", "--out_dir", str(tmp_path), "--only",
                       "eager block", "--exact", "--profile", "eager block"]) == 0
    text = (tmp_path / "profile_tiny_eager_block.md").read_text()
    assert "| top CPU ops | calls a step | ms a step |" in text and "| aten::mm |" in text


def test_bench_runs_each_lean_plan_under_the_compile_units_it_does_not_use():
    """`(whole model)` for every lean plan that keeps its activations on the device and steps
    after backward, which compile block by block with CUDA graphs; `(no cuda graphs)` for none
    +lean and block +lean, and for none and block, whose whole model replays as CUDA graphs."""
    import bench
    from neuromanifold_gpt import distributed

    variants = {label: variant for label, _, variant in bench.our_rows(quick=False)}
    for plan in ("none +lean", "attention +lean", "mlp +lean", "selective +lean", "block +lean",
                 "block/2 +lean", "none +lean budget 0.5"):
        assert variants[f"compiled {plan} (whole model)"] == "whole model"
    assert not [label for label in variants if "offload" in label and "(" in label]
    for plan in ("none +lean", "block +lean", "none", "block"):
        assert variants[f"compiled {plan} (no cuda graphs)"] == "no cuda graphs"
    cuda = (distributed.DistInfo(), torch.device("cuda"), 1)
    assert distributed.cuda_graphs(*cuda)
    with bench.VARIANTS["no cuda graphs"]():
        assert not distributed.cuda_graphs(*cuda)
    # a lean plan compiles block by block; (whole model) compiles it whole, its graphs replayed
    # on either side of the eager loss as the blocks' would be
    lean = TrainConfig.from_flags(**dict(bench.PLANS)["none +lean"]).model_config(65)
    assert distributed.compiles_per_block(lean) and distributed.replays_graphs(lean, *cuda[:2], True, 1)
    with bench.VARIANTS["whole model"]():
        assert not distributed.compiles_per_block(lean)
        assert distributed.replays_graphs(lean, *cuda[:2], True, 1)
