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

from neuromanifold_gpt.data import write_dataset
from neuromanifold_gpt.verify import Criteria, compare, report, results_block, verify_pairs
from tests.conftest import ROOT, one_line_error

CUDA = Criteria(threshold_pct=20, expected_range_pct=(20, 40), loss_tolerance=0.02)


def run(peak, checkpointed, loss=2.0, **changes) -> dict:
    """A run's metrics as train.py writes them (GPT-2 124M on an H200, say)."""
    return {"oom": False, "preset": "gpt2", "params": 123_690_000, "batch_size": 12,
            "block_size": 1024, "gradient_accumulation_steps": 1, "iters": 50, "device": "cuda",
            "dtype": "bfloat16", "gradient_checkpointing": checkpointed,
            "policy": "block" if checkpointed else "none", "device_name": "NVIDIA H200",
            "torch_version": "2.11.0", "peak_memory_gb": peak,
            "peak_memory_source": "torch.cuda.max_memory_allocated", "step_time_ms": 100.0,
            "final_train_loss": loss, "final_val_loss": loss, "last_step_loss": loss,
            "world_size": 1, "compile": True, "lean_loss": False, "offload_activations": False,
            "optimizer_in_backward": False, "activation_memory_budget": 1.0,
            "code_hash": "c0de", "commit": "0123abc", "dirty": False} | changes


OOM = {"oom": True, "preset": "gpt2", "error": "CUDA out of memory", "device_name": "NVIDIA H200",
       "torch_version": "2.11.0", "code_hash": "c0de"}


def test_results_block_is_the_designed_one():
    result = compare("gpt2", run(12.5, False), run(8.75, True, step_time_ms=130.0), CUDA)
    assert results_block(result) == """RESULTS
================================================================================

  Baseline peak memory:    12.500 GB
  Optimized peak memory:   8.750 GB
  Memory reduction:        3.750 GB (30.0%)

  ✓ SUCCESS: Memory reduction (30.0%) is within expected range (20-40%)

VERIFICATION PASSED ✓"""
    assert result["passed"] and result["step_time_ratio"] == pytest.approx(1.3)


@pytest.mark.parametrize("optimized, criteria, passed, verdict", [
    (run(5.0, True), CUDA, True, "is above the expected range (20-40%)"),
    (run(9.0, True), Criteria(5, (20, 40), 1e-5), True,
     "is above the threshold (5%) but below the expected range (20-40%)"),
    (run(9.0, True), CUDA, False, "✗ FAILURE: Memory reduction (10.0%) is not above the threshold (20%)"),
    (run(7.0, True, final_val_loss=2.5), CUDA, False, "checkpointing changed training"),
    (OOM, CUDA, False, "✗ FAILURE: the checkpointed run ran out of memory"),
])
def test_verdicts(optimized, criteria, passed, verdict):
    result = compare("gpt2", run(10.0, False), optimized, criteria)
    assert result["passed"] is passed and verdict in result["verdict"]
    assert results_block(result).endswith("VERIFICATION PASSED ✓" if passed else "VERIFICATION FAILED ✗")


def test_a_baseline_out_of_memory_is_the_strongest_pass():
    result = compare("gpt2-medium", OOM, run(30.0, True), CUDA)
    assert result["passed"] and result["baseline_oom"]
    assert "  Baseline peak memory:    out of memory\n" in results_block(result)
    assert "  Optimized peak memory:   30.000 GB\n" in results_block(result)


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
    assert done.stdout.rstrip().endswith("VERIFICATION PASSED ✓")
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
    summary = json.loads(Path("metrics/verify.json").read_text())
    assert summary["passed"] is True and summary["sizes"]["tiny"]["reduction_pct"] > 5
    assert summary["sizes"]["tiny"]["loss_diff"] == 0


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
    assert result["reduction_pct"] == 20.0 and result["passed"] is False
    assert compare("gpt2", run(10.0, False), run(7.99, True), CUDA)["passed"] is True


@pytest.mark.parametrize("optimized_loss", [1.9, 2.1])
def test_a_loss_difference_fails_in_either_direction(optimized_loss):
    result = compare("gpt2", run(12.5, False), run(8.75, True, loss=optimized_loss), CUDA)
    assert result["loss_diff"] == pytest.approx(0.1) and result["passed"] is False


BAD_FIELDS = [("oom", "yes", "true or false"), ("oom", 0, "true or false"),
              ("peak_memory_gb", -3.0, "a number > 0"), ("peak_memory_gb", 0, "a number > 0"),
              ("step_time_ms", 0.0, "a number > 0"), ("final_val_loss", float("nan"), "a finite number"),
              ("last_step_loss", "2.0", "a finite number"),
              ("gradient_checkpointing", "true", "true or false"),
              ("batch_size", 0, "a whole number > 0"), ("params", 1.5e8, "a whole number > 0"),
              ("activation_memory_budget", 2, "a number in [0, 1]"), ("device", "gpu", "cpu or cuda")]


@pytest.mark.parametrize("field, value, expected", BAD_FIELDS)
@pytest.mark.parametrize("which", ["baseline", "checkpointed"])
def test_verify_refuses_fields_of_the_wrong_type_or_range(field, value, expected, which, tmp_path):
    runs = {"baseline": run(12.5, False), "checkpointed": run(8.75, True)}
    runs[which][field] = value
    for name, data in runs.items():
        path = tmp_path / "metrics" / "train" / "gpt2" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))  # NaN as JSON's non-standard NaN, as json.dumps writes it
    params = {"verify": {"threshold_pct": 20, "expected_range_pct": [20, 40], "loss_tolerance": 0.02}}
    with pytest.raises(ValueError, match=rf"{which}.json: {field} is .*, not {re.escape(expected)}"):
        verify_pairs(params, ["gpt2"], tmp_path)


def test_a_diverged_run_is_a_failure_not_a_comparison():
    diverged = {"oom": False, "nonfinite_loss": True, "nonfinite_step": 7, "preset": "gpt2",
                "device_name": "NVIDIA H200", "torch_version": "2.11.0", "code_hash": "c0de"}
    result = compare("gpt2", run(12.5, False), diverged, CUDA)
    assert result["passed"] is False
    assert result["verdict"] == "✗ FAILURE: the checkpointed run's loss became non-finite at step 7"


@pytest.mark.parametrize("field, value", [("oom", "yes"), ("peak_memory_gb", -1.0), ("step_time_ms", 0)])
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
