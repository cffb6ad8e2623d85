"""The benchmark tools (benchmarks/): the bench's files and rows, each row a config the library
accepts, the profile summary, the loss kernels against fp64, the plan costs the planner reads,
and the planner's checks; bad input is one line and exit 2."""

import json
import statistics
from unittest import mock

import pytest
import torch

from benchmarks import bench, loss_kernels, plan_costs, plans, profile, reports, rows
from neuromanifold_gpt import loss, provenance
from neuromanifold_gpt.config.base import TrainConfig
from neuromanifold_gpt.config.cli import parse_args
from neuromanifold_gpt.planner import PLANS, load_costs, resolve
from neuromanifold_gpt.predictor import predict
from tests.conftest import one_line_error


def test_bench_quick_writes_json_table_and_plot(tmp_path):
    assert bench.main(["--quick", "--steps", "1", "--out_dir", str(tmp_path),
                       "--only", "none,block +lean"]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    labels = [r["label"] for r in data["rows"]]
    assert labels[:2] == ["eager none", "eager none +lean"] and "eager block +lean" in labels
    base = next(r for r in data["rows"] if r["label"] == data["rows"][0]["baseline"])
    assert base["recompute"] == "none" and base["mem_vs_baseline"] == 1.0
    assert all(r["step_ms"] > 0 and r["peak_allocated_gb"] > 0 for r in data["rows"])
    # the code measured, named as a training run's record names it
    assert data["code_hash"] == provenance.code_hash() and "git_commit" in data
    assert "| eager block +lean" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0
    # the report mode rebuilds the same table from the JSON
    assert bench.main(["--report", str(tmp_path / "bench.json"), "--out_dir",
                       str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "bench.md").read_text() == (tmp_path / "bench.md").read_text()


def test_reports_merged_give_each_row_the_median_of_all_their_runs_and_its_spread(tmp_path):
    """Three bench.json files of one machine (one process each): a row's step time is the median
    over every run the files hold, its spread their min-max, its peaks the largest."""
    def row(label, runs, peak, oom=False):
        ms = statistics.median(runs)
        return dict(preset="gpt2", label=label, impl="ours", variant=None, recompute="none",
                    compile=True, oom=oom, peak_allocated_gb=peak, peak_reserved_gb=peak + 0.5,
                    step_ms=ms, step_ms_min=min(runs), step_ms_max=max(runs), step_ms_runs=runs,
                    tokens_per_s=12_000 / ms * 1000, wall_s=[1.0] * len(runs), predicted_gb=5.0,
                    memory_source="torch.cuda.max_memory_allocated")

    meta = dict(device="H100", torch_version="2.11", steps=20, repeat=2)
    reports_rows = [[row("compiled none", [30.0, 36.0], 5.0), row("compiled block", [40.0, 41.0], 3.0)],
                    [row("compiled none", [20.0, 33.0], 5.25)],
                    [row("compiled none", [40.0, 31.0], 5.0), row("compiled block", [1.0], 0, oom=True)]]
    files = []
    for name, report_rows in zip("abc", reports_rows, strict=True):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(dict(meta, rows=report_rows)))
    out = tmp_path / "merged"
    assert bench.main(["--report", ",".join(map(str, files)), "--out_dir", str(out)]) == 0
    merged = {r["label"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    none = merged["compiled none"]
    assert none["step_ms_runs"] == [30.0, 36.0, 20.0, 33.0, 40.0, 31.0]
    assert (none["step_ms"], none["step_ms_min"], none["step_ms_max"]) == (32.0, 20.0, 40.0)
    runs_tokens = [12_000 / ms * 1000 for ms in none["step_ms_runs"]]  # each run's tokens/s
    assert none["tokens_per_s"] == pytest.approx(statistics.median(runs_tokens))
    assert (none["peak_allocated_gb"], none["peak_reserved_gb"]) == (5.25, 5.75)
    table = next(line for line in (out / "bench.md").read_text().splitlines() if "compiled none" in line)
    assert [cell.strip() for cell in table.split("|")[3:7]] == ["5.25", "5.75", "32.0", "20.0-40.0"]
    assert merged["compiled block"]["oom"]  # a run out of memory: the row does not fit


def test_bench_runs_the_lean_rows_at_the_chunk_sizes_asked_for(tmp_path):
    with mock.patch.object(loss, "_add_chunk_grads", wraps=loss._add_chunk_grads) as chunks:
        assert bench.main(["--quick", "--steps", "1", "--out_dir", str(tmp_path), "--only",
                           "eager none,eager none +lean", "--exact", "--loss_chunks", "8,8"]) == 0
    by_label = {r["label"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert list(by_label) == ["eager none", "eager none +lean", "eager none +lean (8 tokens a chunk)"]
    # 2 x 32 tokens, two steps a row (warm-up and timed): one chunk a step, then eight
    assert chunks.call_count == 2 * 1 + 2 * 8
    chunked = by_label["eager none +lean (8 tokens a chunk)"]
    assert chunked["variant"] == "8 tokens a chunk" and len(chunked["step_ms_runs"]) == 1
    # the row is a config field, and its prediction counts its own chunk
    assert rows.variant_fields("8 tokens a chunk") == dict(loss_chunk_tokens=8)

    def loss_phase_gb(variant):
        cfg = rows.bench_config("tiny", str(tmp_path), 1, (2, 32),
                                dict(lean_loss=True, **rows.variant_fields(variant)))
        return predict(resolve(cfg, 65, torch.device("cpu"), torch.float32)).phases["loss"]

    assert loss_phase_gb("8 tokens a chunk") < loss_phase_gb(None)
    # a chunk row can be named by itself
    assert bench.main(["--quick", "--steps", "1", "--out_dir", str(tmp_path / "named"), "--exact",
                       "--only", "eager block +lean (16 tokens a chunk)", "--loss_chunks", "16"]) == 0
    named = json.loads((tmp_path / "named" / "bench.json").read_text())["rows"]
    assert [r["label"] for r in named] == ["eager block +lean (16 tokens a chunk)"]


@pytest.mark.parametrize("quick", [True, False])
def test_every_row_is_a_config_the_library_accepts(tmp_path, quick):
    """Rows and variants are TrainConfig fields, never patches of the package."""
    jobs = rows.bench_jobs("tiny" if quick else "gpt2", quick, have_hf=False, loss_chunks=(512,))
    variants = {variant for _, _, _, variant in jobs}
    assert variants == ({None, "512 tokens a chunk"} | (set() if quick else set(rows.VARIANTS)))
    for _, label, kw, variant in jobs:
        cfg = rows.bench_config("tiny" if quick else "gpt2", str(tmp_path), 1, (2, 32), kw)
        flat = cfg.to_dict()
        assert flat["eval_iters"] == 0, label  # no evaluation: it measures nothing here
        assert all(flat[k] == v for k, v in {**kw, **rows.variant_fields(variant)}.items()), label


def test_plan_costs_are_the_compiled_plans_steps_over_the_fastest_with_the_runs_they_had(tmp_path):
    def row(label, runs, **kw):  # merge_repeats's row: the median of the runs' steps
        return {**dict(preset="gpt2", impl="ours", label=label, oom=False, step_ms=statistics.median(runs),
                       step_ms_runs=runs, batch_size=12, block_size=1024), **kw}

    bench_rows = [row("compiled none", [20.0, 21.0, 19.0]), row("compiled block", [30.0, 31.0]),
                  row("compiled block +lean (cce)", [10.0], variant="cce"), row("eager none", [5.0]),
                  row("compiled none", [9.0], preset="gpt2-medium")]
    meta = dict(device="H100", torch_version="2.11", steps=20, repeat=3)
    report = tmp_path / "bench.json"
    report.write_text(json.dumps(dict(meta, rows=bench_rows)))
    costs_file = tmp_path / "plan_costs.json"
    assert plan_costs.main(["--report", str(report), "--write_costs", "gpt2",
                            "--costs_file", str(costs_file)]) == 0
    costs = load_costs(costs_file)  # what the planner reads
    assert costs["step_ratio"] == {"none": 1.0, "block": 1.525}
    assert costs["hardware"] == ("H100, torch 2.11, bf16 autocast, compiled, gpt2 at 12 x 1024, "
                                 "python3 -m benchmarks.bench --steps 20, the median of 2-3 interleaved "
                                 "runs a row")
    _, once = plan_costs.plan_steps(dict(meta, repeat=1), [row("compiled none", [20.0])], "gpt2")
    assert once.endswith("python3 -m benchmarks.bench --steps 20, one run a row")


def test_budget_plans_are_compared_with_the_fastest_fitting_row_of_several_reports(tmp_path):
    """--against takes several bench.json files (one per process of a split bench): a row that
    several hold is merged over their runs."""
    def row(label, gb, ms):
        return dict(preset="gpt2", label=label, impl="ours", variant=None, oom=False,
                    peak_allocated_gb=gb, peak_reserved_gb=gb, step_ms=ms, tokens_per_s=1e6 / ms,
                    wall_s=[1.0])

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(dict(device="d", rows=[row("compiled none", 6.8, 29.0),
                                                       row("compiled block +lean", 2.4, 36.0)])))
    second.write_text(json.dumps(dict(device="d", rows=[row("compiled none", 6.8, 30.0),
                                                        row("compiled block", 3.9, 33.0)])))
    meta, merged = reports.read_reports(f"{first},{second}")
    assert meta["sources"] == [str(first), str(second)] and len(merged) == 3
    merged_file = tmp_path / "merged.json"
    merged_file.write_text(json.dumps(dict(meta, rows=merged)))
    assert reports.read_reports(str(merged_file))[0]["sources"] == [str(first), str(second)]
    other = tmp_path / "c.json"
    other.write_text(json.dumps(dict(device="e", rows=[])))
    with pytest.raises(ValueError, match="its device .* is not that of the reports before it"):
        reports.read_reports(f"{first},{other}")
    other.write_text(json.dumps(dict(device="d", code_hash="abc", rows=[])))  # other code
    with pytest.raises(ValueError, match=r"its code_hash \('abc'\) is not that of the reports before "
                                         r"it \(None\); merge reports of one machine, torch, code and"):
        reports.read_reports(f"{first},{other}")
    assert plans.fastest_bench_row(merged, "gpt2", 10)["step_ms"] == 29.5  # both files' median
    assert plans.fastest_bench_row(merged, "gpt2", 4)["label"] == "compiled block"
    assert plans.fastest_bench_row(merged, "gpt2", 3)["label"] == "compiled block +lean"
    assert plans.fastest_bench_row(merged, "gpt2", 2) is None


def test_merged_reports_keep_an_out_of_memory_and_let_a_measured_run_replace_an_error(tmp_path):
    def row(label, ms=30.0, **kw):
        return dict(preset="gpt2", label=label, impl="ours", variant=None, oom=False,
                    peak_allocated_gb=2.0, peak_reserved_gb=2.0, step_ms=ms, tokens_per_s=1e6 / ms,
                    wall_s=[1.0], **kw)

    def broken(label, oom):  # as run_row records a run that measured nothing
        return dict(preset="gpt2", label=label, impl="ours", variant=None, wall_s=1.0, oom=oom,
                    **({} if oom else {"failed": "RuntimeError: x"}))

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(dict(device="d", rows=[
        broken("errs", oom=False), row("runs out"), broken("errs twice", oom=False)])))
    second.write_text(json.dumps(dict(device="d", rows=[
        row("errs", ms=40.0), broken("runs out", oom=True), broken("errs twice", oom=False)])))
    for paths in (f"{first},{second}", f"{second},{first}"):
        merged = {r["label"]: r for r in reports.read_reports(paths)[1]}
        assert merged["errs"]["step_ms"] == 40.0 and not reports.failed(merged["errs"])
        assert merged["runs out"]["oom"] is True
        assert reports.failed(merged["errs twice"])


def test_loss_kernels_checks_each_kernel_against_fp64(tmp_path):
    assert loss_kernels.main(["--quick", "--steps", "1", "--loss_chunks", "37",
                              "--out_dir", str(tmp_path)]) == 0
    found = json.loads((tmp_path / "loss_kernels.json").read_text())["rows"]
    kernels = ["plain", "ours", "ours, 37 tokens a chunk"]
    speed = [r for r in found if r["kind"] == "speed"]
    assert [r["kernel"] for r in speed] == kernels and all(r["ms"] > 0 for r in speed)
    accuracy = [r for r in found if r["kind"] == "accuracy"]
    assert {(r["head"], r["kernel"]) for r in accuracy} == {
        (h, k) for h in ("random", "shared direction") for k in kernels}
    for r in accuracy:  # bf16 rounding, nothing more
        assert r["loss_error"] < 1e-3 and r["grad_x_error"] < 1e-2 and r["grad_w_error"] < 1e-2, r
    assert "| shared direction" in (tmp_path / "loss_kernels.md").read_text()
    if not torch.cuda.is_available():
        assert loss_kernels.main(["--out_dir", str(tmp_path / "cuda")]) == 2
        assert not (tmp_path / "cuda").exists()


@pytest.mark.parametrize("tool, argv, message", [
    (plans, ["--plans", "batch,sizes"], "error: --plans 'batch,sizes': name the tables batch and/or budget"),
    (plans, ["--plans", "budget", "--budgets", "3,lots"],
     "error: --budgets '3,lots': expected GiB as numbers, comma-separated"),
    (plans, ["--plans", "batch", "--batch_plans", "none,blok"],
     "error: --batch_plans: unknown plan 'blok'; choose from none, block, block +lean"),
    (bench, ["--quick", "--exact"],
     "error: --exact matches whole labels given by --only; name the rows with --only"),
    (bench, ["--quick", "--loss_chunks", "64,0"], "error: --loss_chunks takes token counts of at least 1"),
    (bench, ["--quick", "--only", "eager none", "--exact", "--loss_chunks", "64"],
     "error: --loss_chunks adds rows of the lean plans, and --only selects none; select one, "
     "e.g. --only 'eager none +lean'"),
    (bench, ["--quick", "--only", "eager nothing", "--exact"],
     "error: --only 'eager nothing' selects no row; name rows as bench.md labels them, e.g. "
     "'eager none'"),
    (bench, ["--report", "out/bench/bench.json", "--loss_chunks", "64"],
     "error: --loss_chunks adds rows of the lean plans; it does not go with --report"),
    (bench, ["--quick", "--steps", "0"], "error: --steps and --repeat must be at least 1"),
    (bench, ["--report", "out/nowhere/bench.json"],
     "error: bench report out/nowhere/bench.json is missing; run python3 -m benchmarks.bench, which "
     "writes it as OUT_DIR/bench.json (--out_dir, out/bench by default)"),
    (profile, ["--quick", "--profile", "eager blok"],
     "error: --profile 'eager blok' is not a row of the bench; name one as bench.md labels it, "
     "e.g. 'eager none'"),
    (profile, ["--quick", "--profile", "eager none", "--profile_steps", "0"],
     "error: --profile_steps must be at least 1"),
    (profile, ["--quick"], "error: --profile names the rows to profile, as bench.md labels them, e.g. "
     "--profile 'compiled block +lean'"),
    (loss_kernels, ["--quick", "--loss_chunks", "64,many"],
     "error: --loss_chunks '64,many': expected token counts, comma-separated"),
    (loss_kernels, ["--quick", "--repeat", "0"], "error: --steps and --repeat must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, tool, argv, message):
    assert tool.main([*argv, "--out_dir", str(tmp_path / "plans")]) == 2
    assert one_line_error(capsys).strip() == message
    assert not (tmp_path / "plans").exists()  # nothing started


@pytest.mark.parametrize("argv, message", [
    (["--report", "out/nowhere/bench.json"],
     "error: bench report out/nowhere/bench.json is missing; run python3 -m benchmarks.bench, which "
     "writes it as OUT_DIR/bench.json (--out_dir, out/bench by default)"),
    ([], "error: --report names the bench.json files to read, e.g. --report out/bench/bench.json"),
])
def test_plan_costs_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    costs_file = tmp_path / "plan_costs.json"
    assert plan_costs.main([*argv, "--costs_file", str(costs_file)]) == 2
    assert one_line_error(capsys).strip() == message
    assert not costs_file.exists()


def test_plan_costs_of_a_preset_the_report_lacks_are_refused_and_the_table_stays(tmp_path, capsys):
    report = tmp_path / "bench.json"
    report.write_text(json.dumps(dict(device="d", torch_version="t", steps=20, rows=[])))
    costs_file = tmp_path / "plan_costs.json"
    costs_file.write_text("{}\n")
    assert plan_costs.main(["--report", str(report), "--write_costs", "gpt2",
                            "--costs_file", str(costs_file)]) == 2
    assert one_line_error(capsys).strip() == (
        "error: no compiled rows of preset 'gpt2' in the report; run python3 -m benchmarks.bench "
        "--presets gpt2 first")
    assert costs_file.read_text() == "{}\n"


def test_plans_check_the_recommended_batch_under_the_plans_asked_for(tmp_path, monkeypatch):
    """--batch_plans picks the plans a batch check trains, once each, in the order given, and
    the table has a row for each run."""
    calls = []

    def fake_run(data_dir, preset, extra, steps, metrics):
        calls.append((preset, extra))
        return dict(preset=preset, exit=0, batch_size=8, predicted_gb=2.0, peak_gb=1.9, reserved_gb=2.1)

    monkeypatch.setattr(plans, "run_train", fake_run)
    argv = ["--plans", "batch", "--batch_presets", "shakespeare_char",
            "--batch_plans", "block +lean,none,block +lean", "--out_dir", str(tmp_path)]
    assert plans.main(argv) == 0
    assert calls == [("shakespeare_char", ["--batch_size", "auto", *plans.PLAN_FLAGS[p]])
                     for p in ("block +lean", "none")]
    table = [line for line in (tmp_path / "plans.md").read_text().splitlines()
             if line.startswith("| shakespeare_char")]
    assert table == ["| shakespeare_char | block +lean | 8 | 2.00 | 1.90 | +5.3 | 2.10 | yes |",
                     "| shakespeare_char | none | 8 | 2.00 | 1.90 | +5.3 | 2.10 | yes |"]
    # train.py reads each plan's flags as the plan's fields
    for label, flags in plans.PLAN_FLAGS.items():
        flat = parse_args(flags).to_dict()
        assert {k: flat[k] for k in dict(PLANS)[label]} == dict(PLANS)[label]


def test_profile_sorts_the_device_time_by_kernel_kind(tmp_path):
    """The profile summary from key_averages-like events, and the profile of a row on the CPU."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

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
    text = profile.profile_summary(events, steps=2, wall_s=0.002)
    assert "step: 1.00 ms wall over 2 profiled steps" in text
    assert "device busy: 1.00 ms a step (100% of the step)" in text
    assert "| matmul (cuBLAS / CUTLASS) | 0.50 | 50.0% |" in text
    assert "| compiled (inductor's Triton) | 0.30 | 30.0% |" in text
    assert "| cut-cross-entropy | 0.20 | 20.0% |" in text
    assert "| compiled forward | 0.15 |" in text
    assert "| triton_per_fused_native_layer_norm_0 | 12 | 0.300 |" in text

    assert profile.main(["--quick", "--out_dir", str(tmp_path), "--profile", "eager block",
                         "--profile_steps", "2"]) == 0
    text = (tmp_path / "profile_tiny_eager_block.md").read_text()
    assert "step: " in text and "over 2 profiled steps" in text
    assert "| top CPU ops | calls a step | ms a step |" in text and "| aten::mm |" in text
    assert [p.name for p in tmp_path.iterdir()] == ["profile_tiny_eager_block.md"]  # that row alone


def test_bench_runs_each_lean_plan_under_the_compile_units_it_does_not_use():
    """`(whole model)` for every lean plan that keeps its activations on the device and steps
    after backward, which compile block by block with CUDA graphs; `(no cuda graphs)` for none
    +lean and block +lean, and for none and block, whose whole model replays as CUDA graphs.
    Each is a config field that the library's plan follows."""
    variants = {label: (kw, variant) for label, kw, variant in rows.our_rows(quick=False)}

    def plan(label):  # what the library would do with the row's config on a GPU
        cfg = TrainConfig.from_flags(preset="gpt2", **variants[label][0])
        return resolve(cfg, 50257, torch.device("cuda"), torch.bfloat16)

    for name in ("none +lean", "attention +lean", "mlp +lean", "selective +lean", "block +lean",
                 "block/2 +lean", "none +lean budget 0.5"):
        assert variants[f"compiled {name} (whole model)"][1] == "whole model"
        blocks, whole = plan(f"compiled {name}"), plan(f"compiled {name} (whole model)")
        assert (blocks.compile_unit, blocks.cuda_graphs) == ("block", True)
        assert (whole.compile_unit, whole.cuda_graphs) == ("model", True)
    assert not [label for label in variants if "offload" in label and "(" in label]
    for name in ("none +lean", "block +lean", "none", "block"):
        assert variants[f"compiled {name} (no cuda graphs)"][1] == "no cuda graphs"
        graphs, launched = plan(f"compiled {name}"), plan(f"compiled {name} (no cuda graphs)")
        assert graphs.cuda_graphs and not launched.cuda_graphs
        assert graphs.compile_unit == launched.compile_unit == ("block" if "lean" in name else "model")
    for name in ("cce", "cce filtered", "liger"):
        assert variants[f"compiled block +lean ({name})"][1] == name
        assert plan(f"compiled block +lean ({name})").levers.loss_kernel == name.replace(" ", "_")
    assert plan("compiled block +lean").levers.loss_kernel == "chunked"
