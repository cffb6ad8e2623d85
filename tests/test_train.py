"""The training loop: metrics, unchanged training under checkpointing, resume, measured memory."""

import json
import subprocess
import sys

import pytest
import torch

from neuromanifold_gpt.config.cli import parse_args
from neuromanifold_gpt.trainer import Trainer, train
from tests.conftest import ROOT


def run(args, **kw):
    return train(parse_args(args), quiet=kw.get("quiet", True))


def test_metrics_file_and_memory_trace(tiny_args, tmp_path, capsys):
    metrics_file, trace = tmp_path / "m" / "run.json", tmp_path / "trace.tsv"
    m = train(parse_args(tiny_args + ["--max_iters", "6", "--metrics_file", str(metrics_file),
                                      "--memory_trace_file", str(trace)]))
    out = capsys.readouterr().out
    assert "number of parameters: 0.03M" in out and "tokens per iteration will be: 128" in out
    assert "✗ Gradient checkpointing: DISABLED" in out
    assert "iter 5: loss" in out and "memory/cpu_max_tensor_gb" in out and "step 6: train loss" in out
    saved = json.loads(metrics_file.read_text())
    for key in ("peak_memory_gb", "peak_memory_source", "tokens_per_sec", "step_time_ms",
                "final_train_loss", "final_val_loss", "params", "policy", "batch_size",
                "block_size", "device_name", "torch_version"):
        assert saved[key] is not None, key
    assert saved["policy"] == "none" and saved["peak_memory_source"] == "CPU tensor storage, counted op by op"
    assert saved["peak_rss_gb"] > 0.05 + saved["peak_memory_gb"]  # the Python process with torch loaded
    assert saved["torch_version"] == torch.__version__ and m["losses"][-1] < m["losses"][0]
    rows = trace.read_text().splitlines()
    assert rows[0] == "step\tloss\tpeak_memory_gb\tpeak_reserved_gb" and len(rows) == 7


def test_checkpointing_does_not_change_training(tiny_args):
    base = run(tiny_args + ["--max_iters", "4", "--dropout", "0.2"])
    for policy in ("block", "selective"):
        ck = run(tiny_args + ["--max_iters", "4", "--dropout", "0.2", "--gradient_checkpointing",
                              "true", "--checkpoint_policy", policy])
        assert ck["policy"] == policy and ck["checkpointed_blocks"] == 2
        assert ck["losses"] == pytest.approx(base["losses"], rel=1e-5)
        assert ck["final_val_loss"] == pytest.approx(base["final_val_loss"], rel=1e-5)


def test_resume_continues_the_same_loss_curve(tiny_args, tmp_path):
    args = tiny_args + ["--dropout", "0.2", "--out_dir", str(tmp_path), "--eval_interval", "3"]
    straight = run(args + ["--max_iters", "6"])
    first = run(args + ["--max_iters", "3", "--save_snapshot", "true"])
    resumed = run(args + ["--max_iters", "6", "--init_from", "resume"])
    assert first["losses"] == pytest.approx(straight["losses"][:3], rel=1e-6)
    assert resumed["losses"] == pytest.approx(straight["losses"][3:], rel=1e-5)
    assert resumed["iters"] == 6


def test_fetching_the_next_batch_ahead_trains_on_the_same_batches(tiny_args, tmp_path, monkeypatch):
    """Each step fetches the next one's batch while the device works; the batches, evaluations
    between steps included, are those of a loop that reads each batch when it needs it. The
    last step fetches nothing: no step would use it."""
    args = tiny_args + ["--max_iters", "5", "--eval_interval", "2", "--gradient_accumulation_steps", "2"]
    fetched, fetch = [], Trainer.fetch_ahead
    monkeypatch.setattr(Trainer, "fetch_ahead", lambda self: fetched.append(self.iter_num) or fetch(self))
    ahead = run(args)
    assert fetched == [0, 1, 2, 3]
    monkeypatch.setattr(Trainer, "fetch_ahead", lambda self: None)
    assert run(args)["losses"] == pytest.approx(ahead["losses"], rel=1e-6)


def test_resume_without_snapshot_is_a_clear_error(tiny_args, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        run(tiny_args + ["--out_dir", str(tmp_path), "--init_from", "resume"])


def peak_of_fresh_process(args, tmp_path, name):
    metrics = tmp_path / f"{name}.json"
    r = subprocess.run([sys.executable, "train.py", *args, "--metrics_file", str(metrics)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(metrics.read_text())["peak_memory_gb"]


def test_block_checkpointing_measurably_lowers_cpu_peak(data_dir, tmp_path):
    # Wide enough that activations (not torch's own ~0.3 GB) set the peak.
    args = ["--data_dir", str(data_dir), "--dataset", "tiny", "--device", "cpu", "--n_layer", "6",
            "--n_head", "4", "--n_embd", "128", "--batch_size", "32", "--block_size", "256",
            "--max_iters", "3", "--eval_iters", "1", "--dropout", "0"]
    none = peak_of_fresh_process(args, tmp_path, "none")
    block = peak_of_fresh_process(args + ["--gradient_checkpointing", "true"], tmp_path, "block")
    assert block < none - 0.08, (none, block)  # GiB of peak RSS (measured: 0.82 vs 0.68)
