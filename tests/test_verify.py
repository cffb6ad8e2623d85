"""Verification: the RESULTS block and its verdicts, the stand-alone verifier on real runs,
and the verify stage's exit codes (0 pass, 1 fail, 2 missing or corrupt metrics)."""

import json
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from neuromanifold_gpt.config.base import POLICIES
from neuromanifold_gpt.data import write_dataset
from neuromanifold_gpt.record import RunRecord
from neuromanifold_gpt.verify import Criteria, compare, report, results_block, verify_pairs
from tests.conftest import ROOT, one_line_error


def every_policy(threshold_pct, expected_range_pct=(20, 40), loss_tolerance=0.02) -> dict:
    return dict.fromkeys(POLICIES, Criteria(threshold_pct, expected_range_pct, loss_tolerance))


CUDA = every_policy(20)


def metrics(peak, checkpointed, loss=2.0, **changes) -> dict:
    """A run's metrics file as train.py writes it (GPT-2 124M on an H200, say)."""
    return {"oom": False, "preset": "gpt2", "params": 123_690_000, "batch_size": 12,
            "block_size": 1024, "gradient_accumulation_steps": 1, "iters": 50, "device": "cuda",
            "dtype": "bfloat16", "gradient_checkpointing": checkpointed,
            "policy": "block" if checkpointed else "none", "device_name": "NVIDIA H200",
            "torch_version": "2.11.0", "peak_memory_gb": peak,
            "peak_memory_source": "torch.cuda.max_memory_allocated", "step_time_ms": 100.0,
            "final_train_loss": loss, "final_val_loss": loss, "last_step_loss": loss,
            "world_size": 1, "compile": True, "lean_loss": False, "offload_activations": False,
            "optimizer_in_backward": False, "activation_memory_budget": 1.0,
            "code_hash": "c0de", "git_commit": "0123abc", "git_dirty": False} | changes


def run(peak, checkpointed, loss=2.0, **changes) -> RunRecord:
    return RunRecord.from_json(metrics(peak, checkpointed, loss, **changes))


OOM = RunRecord(oom=True, preset="gpt2", error="CUDA out of memory", device="cuda", policy="block",
                device_name="NVIDIA H200", torch_version="2.11.0", code_hash="c0de")


def test_results_block_is_the_designed_one():
    result = compare("gpt2", run(12.5, False), run(8.75, True, step_time_ms=130.0), CUDA)
    assert results_block(result) == """RESULTS
================================================================================

  Baseline peak memory:    12.500 GiB
  Optimized peak memory:   8.750 GiB
  Memory reduction:        3.750 GiB (30.0%)

  ✓ SUCCESS: Memory reduction (30.0%) is within expected range (20-40%)

VERIFICATION PASSED ✓"""
    assert result.passed and result.step_time_ratio == pytest.approx(1.3)


@pytest.mark.parametrize("optimized, criteria, passed, verdict", [
    (run(5.0, True), CUDA, True, "is above the expected range (20-40%)"),
    (run(9.0, True), every_policy(5, (20, 40), 1e-5), True,
     "is above the threshold (5%) but below the expected range (20-40%)"),
    (run(9.0, True), CUDA, False, "✗ FAILURE: Memory reduction (10.0%) is not above the threshold (20%)"),
    (run(7.0, True, final_val_loss=2.5), CUDA, False, "checkpointing changed training"),
    (OOM, CUDA, False, "✗ FAILURE: the checkpointed run ran out of memory"),
])
def test_verdicts(optimized, criteria, passed, verdict):
    result = compare("gpt2", run(10.0, False), optimized, criteria)
    assert result.passed is passed and verdict in result.verdict
    assert results_block(result).endswith("VERIFICATION PASSED ✓" if passed else "VERIFICATION FAILED ✗")


def test_a_baseline_out_of_memory_is_the_strongest_pass():
    result = compare("gpt2-medium", OOM, run(30.0, True), CUDA)
    assert result.passed and result.baseline.oom and result.baseline_peak_gb is None
    assert "  Baseline peak memory:    out of memory\n" in results_block(result)
    assert "  Optimized peak memory:   30.000 GiB\n" in results_block(result)


def test_runs_with_different_settings_are_not_compared():
    with pytest.raises(ValueError, match="differ in batch_size"):
        compare("gpt2", run(10.0, False), run(7.0, True, batch_size=6), CUDA)


def test_report_over_sizes_has_a_table_and_one_verdict():
    results = [compare("gpt2", run(10.0, False), run(7.0, True), CUDA),
               compare("gpt2-medium", run(20.0, False), run(19.0, True), CUDA)]
    text = report(results)
    assert text.count("RESULTS\n") == 2
    assert "gpt2-medium  20.000" in text
    assert text.endswith("1 of 2 sizes passed (gpt2-medium failed): VERIFICATION FAILED ✗")


# -- real runs ---------------------------------------------------------------------------------
def tiny_params(data_dir, threshold_pct) -> dict:
    """A 4-layer model at 32 x 128 on random tokens: seconds per run, activations well above noise."""
    return {
        "train": {"device": "cpu", "seed": 1337, "data_dir": str(data_dir), "dataset": "tiny"},
        "sizes": {"tiny": {"config": "config/train_shakespeare_char.py", "n_layer": 4, "n_head": 4,
                           "n_embd": 128, "batch_size": 32, "block_size": 128, "max_iters": 3,
                           "eval_iters": 1, "log_interval": 1}},
        "checkpointing": {"gradient_checkpointing": True, "checkpoint_policy": "block"},
        "verify": {"threshold_pct": {"cpu": threshold_pct}, "expected_range_pct": [20, 40],
                   "loss_tolerance": {"cpu": 1e-5}},
    }


@pytest.fixture(scope="module")
def verified(tmp_path_factory):
    """The stand-alone verifier's real pair of runs; returns (its output folder, its result)."""
    root = tmp_path_factory.mktemp("verify")
    write_dataset(root / "data" / "tiny", np.random.default_rng(0).integers(0, 65, 200_000),
                  {"vocab_size": 65})
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(root / "data", 5)))
    done = subprocess.run([sys.executable, "verify_gradient_checkpointing.py", "--size", "tiny",
                           "--params", str(root / "params.yaml"), "--out", str(root / "out")],
                          cwd=ROOT, capture_output=True, text=True)
    return root, done


def test_standalone_verifier_passes_on_real_runs(verified):
    root, done = verified
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\nRESULTS\n" + "=" * 80 + "\n\n  Baseline peak memory:    " in done.stdout
    assert "\n\nVERIFICATION PASSED ✓\n" in done.stdout and " GiB (" in done.stdout
    assert done.stdout.endswith("on a CPU it is noise (other processes share the cores), not a "
                                "measure of recompute\n\n1 of 1 sizes passed: VERIFICATION PASSED ✓\n")
    runs = root / "out" / "metrics" / "train" / "tiny"
    base, ckpt = (json.loads((runs / f"{r}.json").read_text()) for r in ("baseline", "checkpointed"))
    assert ckpt["policy"] == "block" and base["policy"] == "none"
    assert base["final_val_loss"] == ckpt["final_val_loss"]  # fp32, one seed: the same training
    log = (root / "out" / "logs" / "tiny" / "checkpointed.log").read_text()
    assert "✓ Gradient checkpointing: ENABLED (policy: block" in log


@pytest.fixture
def stage_dir(verified, tmp_path, monkeypatch):
    """A copy of the verifier's output as the verify stage sees it; returns a function that
    writes params.yaml with a threshold."""
    root, _ = verified
    shutil.copytree(root / "out", tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return lambda threshold_pct: (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(tiny_params(root / "data", threshold_pct)))


VERIFY_STAGE = runpy.run_path(str(ROOT / "stages" / "verify.py"))["main"]


def test_stage_passes_and_writes_verify_json(stage_dir, capsys):
    stage_dir(5)
    assert VERIFY_STAGE() == 0, capsys.readouterr().err
    text = Path("metrics/verify.json").read_text()
    summary = json.loads(text)
    # the headline figures only, always in this order: `dvc metrics diff` stays short and stable
    assert list(summary) == ["passed", "sizes"] and list(summary["sizes"]) == ["tiny"]
    tiny = summary["sizes"]["tiny"]
    assert list(tiny) == ["baseline_peak_gb", "optimized_peak_gb", "reduction_gb", "reduction_pct",
                          "step_time_ratio", "loss_diff", "passed"]
    assert summary["passed"] is True and tiny["passed"] is True and tiny["reduction_pct"] > 5
    assert tiny["reduction_gb"] == pytest.approx(tiny["baseline_peak_gb"] - tiny["optimized_peak_gb"])
    assert tiny["loss_diff"] == 0
    details = json.loads(Path("metrics/verify_details.json").read_text())["sizes"]["tiny"]
    run = json.loads(Path("metrics/train/tiny/checkpointed.json").read_text())
    assert details["verdict"].startswith("✓ SUCCESS: Memory reduction")
    assert {k: details[k] for k in ("policy", "device_name", "torch_version", "code_hash")} == {
        k: run[k] for k in ("policy", "device_name", "torch_version", "code_hash")}
    assert (details["threshold_pct"], details["expected_range_pct"], details["loss_tolerance"]) == (
        5, [20, 40], 1e-5)


def test_stage_fails_when_the_threshold_is_above_the_reduction(stage_dir):
    stage_dir(99)  # as DVC runs it: the process's exit status fails the stage
    done = subprocess.run([sys.executable, str(ROOT / "stages" / "verify.py")], capture_output=True,
                          text=True)
    assert done.returncode == 1
    assert "is not above the threshold (99%)" in done.stdout
    assert done.stdout.rstrip().endswith("VERIFICATION FAILED ✗")
    assert json.loads(Path("metrics/verify.json").read_text())["passed"] is False


@pytest.mark.parametrize("damage, message", [("corrupt", "is corrupt"), ("missing", "is missing")])
def test_stage_refuses_bad_metrics(stage_dir, capsys, damage, message):
    stage_dir(5)
    metrics = Path("metrics/train/tiny/checkpointed.json")
    if damage == "corrupt":
        metrics.write_text('{"peak_memory_gb": 0.5, ')
    else:
        metrics.unlink()
    assert VERIFY_STAGE() == 2
    err = one_line_error(capsys)
    assert message in err and str(metrics) in err
    assert not Path("metrics/verify.json").exists()


def test_a_saving_from_another_lever_is_not_credited_to_checkpointing():
    with pytest.raises(ValueError, match="differ in lean_loss"):
        compare("gpt2", run(12.5, False), run(3.0, True, lean_loss=True), CUDA)


def test_a_reduction_equal_to_the_threshold_is_not_above_it():
    result = compare("gpt2", run(10.0, False), run(8.0, True), CUDA)
    assert result.reduction_pct == pytest.approx(20.0) and result.passed is False
    assert compare("gpt2", run(10.0, False), run(7.99, True), CUDA).passed is True


@pytest.mark.parametrize("optimized_loss", [1.9, 2.1])
def test_a_loss_difference_fails_in_either_direction(optimized_loss):
    result = compare("gpt2", run(12.5, False), run(8.75, True, loss=optimized_loss), CUDA)
    assert result.loss_diff == pytest.approx(0.1) and result.passed is False


GIB, LOSS = "a finite number in (0, 1048576]", "a finite number in [0, 1000000]"
BAD_FIELDS = [("oom", "yes", "true or false"), ("oom", 0, "true or false"),
              ("peak_memory_gb", -3.0, GIB), ("peak_memory_gb", 0, GIB), ("peak_memory_gb", 1e308, GIB),
              ("step_time_ms", 0.0, "a finite number in (0, 1000000000]"),
              ("final_val_loss", float("nan"), LOSS), ("last_step_loss", "2.0", LOSS),
              ("final_train_loss", -1.0, LOSS),
              ("gradient_checkpointing", "true", "true or false"),
              ("batch_size", 0, "a whole number in [1, 9007199254740992]"),
              ("params", 1.5e8, "a whole number in [1, 9007199254740992]"),
              ("activation_memory_budget", 2, "a finite number in [0, 1]"),
              ("device", "gpu", "cpu or cuda"),
              ("policy", "most", "one of none, block, attention, mlp, selective")]


def write_pair(root, baseline: dict, checkpointed: dict) -> None:
    for name, data in (("baseline", baseline), ("checkpointed", checkpointed)):
        path = root / "metrics" / "train" / "gpt2" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))  # NaN as JSON's non-standard NaN, as json.dumps writes it


GPT2_VERIFY = {"verify": {"threshold_pct": 20, "expected_range_pct": [20, 40], "loss_tolerance": 0.02}}


@pytest.mark.parametrize("field, value, expected", BAD_FIELDS)
@pytest.mark.parametrize("which", ["baseline", "checkpointed"])
def test_verify_refuses_fields_of_the_wrong_type_or_range(field, value, expected, which, tmp_path):
    runs = {"baseline": metrics(12.5, False), "checkpointed": metrics(8.75, True)}
    runs[which][field] = value
    write_pair(tmp_path, runs["baseline"], runs["checkpointed"])
    with pytest.raises(ValueError, match=rf"{which}.json: {field} is .*, not {re.escape(expected)}; "
                                         rf"it is corrupt: re-run the training that writes it$"):
        verify_pairs(GPT2_VERIFY, ["gpt2"], tmp_path)


def test_verify_refuses_a_key_no_run_writes(tmp_path):
    write_pair(tmp_path, metrics(12.5, False), metrics(8.75, True, peak_memroy_gb=1.0))
    with pytest.raises(ValueError, match="checkpointed.json has unknown key 'peak_memroy_gb'"):
        verify_pairs(GPT2_VERIFY, ["gpt2"], tmp_path)


def test_a_run_that_used_more_memory_never_passes_whatever_the_threshold():
    # as a hand-made criterion with a negative threshold would have it (params.yaml refuses one)
    result = compare("gpt2", run(1.627, False), run(1.9, True), every_policy(-50))
    assert result.passed is False and result.reduction_pct == pytest.approx(-16.78, abs=0.01)
    assert result.verdict == ("✗ FAILURE: the checkpointed run used more memory than the baseline "
                              "(reduction -16.8%)")
    assert compare("gpt2", run(1.627, False), run(1.627, True), every_policy(0)).passed is False


@pytest.mark.parametrize("policy, passed", [("mlp", True), ("block", False)])
def test_each_policy_is_judged_by_its_own_threshold(tmp_path, policy, passed):
    write_pair(tmp_path, metrics(10.0, False), metrics(9.0, True, policy=policy))
    params = {"verify": {"threshold_pct": {"cuda": {"block": 50, "attention": 5, "mlp": 5,
                                                    "selective": 5}, "cpu": 0},
                         "expected_range_pct": {"cuda": {"block": [50, 65], "attention": [5, 40],
                                                         "mlp": [8, 12], "selective": [5, 40]},
                                                "cpu": [0, 100]},
                         "loss_tolerance": 0.02}}
    result, = verify_pairs(params, ["gpt2"], tmp_path)
    assert result.passed is passed
    assert result.criteria.threshold_pct == (5 if policy == "mlp" else 50)
    assert result.verdict == ("✓ SUCCESS: Memory reduction (10.0%) is within expected range (8-12%)"
                              if passed else "✗ FAILURE: Memory reduction (10.0%) is not above the "
                              "threshold (50%)")


def test_cpu_step_times_are_called_noise():
    cuda = compare("gpt2", run(10.0, False), run(7.0, True), CUDA)
    on_cpu = dict(device="cpu", dtype="float32", peak_memory_source="tensor memory")
    cpu = compare("gpt2", run(10.0, False, **on_cpu), run(7.0, True, **on_cpu), CUDA)
    assert "noise" not in report([cuda])
    assert report([cpu]).endswith("\nstep time x: the checkpointed run's step time over the "
                                  "baseline's; on a CPU it is noise (other processes share the "
                                  "cores), not a measure of recompute\n\n"
                                  "1 of 1 sizes passed: VERIFICATION PASSED ✓")


def test_a_diverged_run_is_a_failure_not_a_comparison():
    diverged = RunRecord(nonfinite_loss=True, nonfinite_step=7, preset="gpt2", policy="block",
                         device="cuda", device_name="NVIDIA H200", torch_version="2.11.0",
                         code_hash="c0de")
    result = compare("gpt2", run(12.5, False), diverged, CUDA)
    assert result.passed is False
    assert result.verdict == "✗ FAILURE: the checkpointed run's loss became non-finite at step 7"


@pytest.mark.parametrize("field, value", [("oom", "yes"), ("peak_memory_gb", -1.0), ("step_time_ms", 0),
                                          ("peak_memory_gb", 1e308)])
def test_stage_refuses_fooling_metrics_and_keeps_verify_json(stage_dir, capsys, field, value):
    stage_dir(5)
    assert VERIFY_STAGE() == 0
    kept = Path("metrics/verify.json").read_bytes()
    metrics = Path("metrics/train/tiny/baseline.json")
    metrics.write_text(json.dumps(json.loads(metrics.read_text()) | {field: value}))
    capsys.readouterr()
    assert VERIFY_STAGE() == 2
    err = one_line_error(capsys)
    assert field in err
    assert Path("metrics/verify.json").read_bytes() == kept


def test_stage_refuses_a_number_too_long_to_read_naming_the_file_and_the_fix(stage_dir, capsys):
    stage_dir(5)
    metrics = Path("metrics/train/tiny/baseline.json")
    metrics.write_text('{"params": ' + "9" * 5000 + ", " + metrics.read_text().lstrip()[1:])
    assert VERIFY_STAGE() == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: metrics file {metrics} is corrupt (") and "digits" in err
    assert err.endswith(f"delete it and run the training that writes it (dvc repro, or train.py "
                        f"--metrics_file {metrics})\n")
    assert "set_int_max_str_digits" not in err  # no advice to change Python for a corrupt file
    assert not Path("metrics/verify.json").exists()
