"""Bad input and faults: every failure is one `error:` line with its exit code, checked before
the first step, and nothing is left half-written or replaced."""

import errno
import json
import os
import pickle
import re
import sys
import time

import numpy as np
import pytest
import torch

import train
from neuromanifold_gpt import files, memory, predictor, reporting, trainer
from neuromanifold_gpt.config.base import TrainConfig
from neuromanifold_gpt.data import write_dataset
from neuromanifold_gpt.errors import BadInput
from tests.conftest import ROOT, Exploit, one_line_error, plan_of


# -- data ------------------------------------------------------------------------------------
def test_an_old_meta_pkl_is_never_unpickled(tiny_args, dataset, tmp_path, capsys):
    marker = tmp_path / "pwned"
    (dataset / "tiny" / "meta.json").unlink()
    (dataset / "tiny" / "meta.pkl").write_bytes(pickle.dumps(Exploit(marker)))
    assert train.main(tiny_args + ["--data_dir", str(dataset), "--max_iters", "1"]) == 2
    err = one_line_error(capsys)
    assert "meta.pkl" in err and "prepare the dataset again" in err
    assert not marker.exists()


@pytest.mark.parametrize("meta", ['{"vocab_size": "65", "train_tokens": 18000, "val_tokens": 2000}',
                                  "[1, 2]", "\xff", '{"vocab_size": 65}'])
def test_a_corrupt_meta_json_is_one_line(meta, tiny_args, dataset, capsys):
    (dataset / "tiny" / "meta.json").write_bytes(meta.encode("latin-1"))
    assert train.main(tiny_args + ["--data_dir", str(dataset), "--max_iters", "1"]) == 2
    assert "meta.json is corrupt" in one_line_error(capsys)


def test_token_ids_beyond_the_vocabulary_are_refused_at_load(tiny_args, tmp_path, capsys):
    ids = np.random.default_rng(0).integers(0, 65, 20_000)
    ids[19_500] = 70  # in val.bin
    write_dataset(tmp_path / "tiny", ids, {"vocab_size": 65})
    assert train.main(tiny_args + ["--data_dir", str(tmp_path), "--max_iters", "1"]) == 2
    assert "val.bin holds token id 70, but" in one_line_error(capsys)


# -- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["learning_rate", "weight_decay", "min_lr", "grad_clip", "beta1",
                                  "dropout", "activation_memory_budget"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_hyperparameters_are_refused(flag, value, tiny_args, tmp_path, capsys):
    argv = tiny_args + ["--max_iters", "2", f"--{flag}", value, "--metrics_file", str(tmp_path / "m.json")]
    assert train.main(argv) == 2
    assert f"{flag}=" in one_line_error(capsys)
    assert not (tmp_path / "m.json").exists()


def test_a_config_file_that_is_not_utf8_names_the_file(tmp_path, capsys):
    config = tmp_path / "latin1.py"
    config.write_bytes("max_iters = 3  # café\n".encode("latin-1"))
    assert train.main(["--config", str(config)]) == 2
    err = one_line_error(capsys)
    assert str(config) in err and "not UTF-8" in err and "save it as UTF-8" in err


# -- training faults -------------------------------------------------------------------------
def test_a_loss_that_turns_non_finite_stops_with_exit_4_and_is_recorded(tiny_args, tmp_path, capsys):
    metrics = tmp_path / "m.json"
    code = train.main(tiny_args + ["--max_iters", "6", "--warmup_iters", "0", "--learning_rate", "1e30",
                                   "--grad_clip", "0", "--metrics_file", str(metrics)])
    assert code == 4
    assert "the training loss became nan at step 1" in one_line_error(capsys)
    record = json.loads(metrics.read_text())
    assert record["nonfinite_loss"] is True and record["nonfinite_step"] == 1 and record["oom"] is False


class OOMAt:
    """Simulates a CUDA out-of-memory where the device first takes memory."""

    def __init__(self, what):
        self.what = what

    def __call__(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({self.what})")


@pytest.mark.parametrize("where", ["model.to(device)", "snapshot load"])
def test_an_oom_during_setup_takes_the_oom_path(where, snapshot_dir, tiny_args, tmp_path,
                                                 monkeypatch, capsys):
    metrics = tmp_path / "m.json"
    args = tiny_args + ["--max_iters", "3", "--metrics_file", str(metrics)]
    if where == "snapshot load":
        monkeypatch.setattr(trainer, "load_snapshot", OOMAt(where))
        args += ["--out_dir", str(snapshot_dir), "--init_from", "resume"]
    else:
        monkeypatch.setattr(torch.nn.Module, "to", OOMAt(where))
    assert train.main(args) == 3
    assert "CUDA out of memory" in one_line_error(capsys)
    record = json.loads(metrics.read_text())
    assert record["oom"] is True and where in record["error"]


@pytest.mark.parametrize("argv, need", [
    (["--n_embd", "1048576", "--n_head", "2"], "393,218.6 GiB (predicted, 26,388.5B parameters)"),
    (["--n_layer", "1" + "0" * 4000], "more GiB than a float can count"),
], ids=["n_embd 1048576", "a 4001-digit n_layer"])
def test_a_model_that_can_never_fit_is_refused_before_any_allocation(argv, need, tiny_args,
                                                                     monkeypatch, capsys):
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda *a: pytest.fail("a module was built"))
    _, total_gb = predictor.device_memory_gb(torch.device("cpu"))
    assert train.main(tiny_args + ["--max_iters", "1"] + argv) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: the model can never fit: its weights, gradients and AdamW "
                          f"states alone need {need}, and the cpu has {total_gb:,.1f} GiB of RAM")


@pytest.mark.parametrize("fsdp, world_size, optimizer_in_backward, bytes_per_param", [
    (False, 1, False, 16), (False, 1, True, 12), (True, 2, False, 8)])
def test_only_a_model_whose_states_exceed_the_whole_device_is_refused(
        fsdp, world_size, optimizer_in_backward, bytes_per_param):
    cfg = TrainConfig.from_flags(n_layer=2, n_head=2, n_embd=64, fsdp=fsdp, grad_clip=0.0,
                                 optimizer_in_backward=optimizer_in_backward,
                                 gradient_accumulation_steps=world_size)
    plan = plan_of(cfg, 64, "cuda", world=world_size, fsdp=fsdp)
    params = predictor.held_params(cfg.model_config(64), False, 1)  # 64: no vocabulary padding
    states_gb = bytes_per_param * params / memory.GIB
    if fsdp:  # every tensor's rows split evenly in two
        assert predictor.held_params(cfg.model_config(64), True, 2) * 2 == params
    predictor.check_states_fit(plan, states_gb)  # fits exactly: tries
    with pytest.raises(BadInput, match="can never fit.*or shard it over more GPUs"):
        predictor.check_states_fit(plan, states_gb * 0.999)


@pytest.mark.parametrize("text, message", [
    ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested more than 32 deep"),
    ('{"peak_memory_gb": ' + "1" * 5000 + "}", "an integer of 5,000 digits"),
    ('{"a": "' + "x" * (files.JSON_MAX_BYTES + 1) + '"}', "bytes, more than the 67,108,864"),
    ("\xff", "invalid start byte"),
], ids=["nested 100000 deep", "a 5000-digit integer", "over the size limit", "not UTF-8"])
def test_a_metrics_file_past_the_parsing_bounds_is_one_line_naming_it(text, message, tmp_path):
    path = tmp_path / "m.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(BadInput) as refused:
        files.read_json(path)
    line = str(refused.value)
    assert line.startswith(f"metrics file {path} is corrupt (") and message in line


# -- measurement honesty ---------------------------------------------------------------------
def test_reset_peak_really_resets_the_cpu_peak():
    cpu = torch.device("cpu")
    block = np.ones(256 * 2**20 // 8)  # 256 MiB, touched
    del block
    before = memory.measure(cpu).peak_gb
    assert memory.reset_peak(cpu) is True
    assert memory.measure(cpu).peak_gb < before - 0.2


def test_a_failed_peak_reset_says_lifetime_peak(monkeypatch):
    real_open = open

    def no_clear_refs(path, *args, **kwargs):
        if str(path) == "/proc/self/clear_refs":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(memory, "open", no_clear_refs, raising=False)
    monitor = memory.MemoryMonitorCallback(torch.device("cpu"), count_tensors=False)
    assert "lifetime" not in monitor.source
    monitor.on_warmup_end()
    assert monitor.source == "process peak RSS (VmHWM), lifetime peak: reset failed"


@pytest.mark.parametrize("platform, maxrss", [("darwin", 3 * 2**30), ("linux", 3 * 2**20)])
def test_ru_maxrss_units_per_os(platform, maxrss, monkeypatch):
    monkeypatch.setattr(memory, "_proc_status_kb", lambda key: None)
    monkeypatch.setattr(memory.sys, "platform", platform)
    monkeypatch.setattr(memory.resource, "getrusage", lambda who: type("R", (), {"ru_maxrss": maxrss}))
    reading = memory.measure(torch.device("cpu"))
    assert reading.peak_gb == pytest.approx(3.0) and "lifetime" in reading.source


@pytest.mark.parametrize("name, peak", [("NVIDIA L4", 121e12), ("NVIDIA L40S", None),
                                        ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", None)])
def test_mfu_peak_is_matched_by_the_exact_device_name(name, peak, monkeypatch):
    monkeypatch.setattr(reporting, "device_name", lambda device: name)
    assert reporting.peak_flops(torch.device("cpu"), 1) == peak


def test_concurrent_verifications_do_not_share_a_folder(data_dir, tmp_path, monkeypatch, capsys):
    import fcntl
    import runpy

    import yaml

    verify_main = runpy.run_path(str(ROOT / "verify_gradient_checkpointing.py"))["main"]
    params = torchrun_params(data_dir, 1) | {"verify": {"threshold_pct": 5, "loss_tolerance": 1e-5,
                                                        "expected_range_pct": [20, 40]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(ROOT)
    with open(tmp_path / "out" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a first run, still running
        start = time.monotonic()
        argv = ["--size", "tiny", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out")]
        assert verify_main(argv) == 2
        assert time.monotonic() - start < 30
    assert "another verify_gradient_checkpointing.py run is using" in one_line_error(capsys)
    assert os.listdir(tmp_path / "out") == [".lock"]


# -- torchrun --------------------------------------------------------------------------------
def torchrun_params(data_dir, nproc: int) -> dict:
    return {"train": {"device": "cpu", "data_dir": str(data_dir), "dataset": "tiny", "nproc": nproc},
            "sizes": {"tiny": {"config": "config/train_shakespeare_char.py", "n_layer": 2,
                               "n_head": 2, "n_embd": 32, "batch_size": 4, "block_size": 32,
                               "max_iters": 2, "eval_iters": 1, "gradient_accumulation_steps": 2}},
            "checkpointing": {"gradient_checkpointing": True}}


@pytest.mark.parametrize("override, message", [
    (["--learning_rate", "nan"], "learning_rate=nan must be a finite number"),
    (["--gradient_accumulation_steps", "3"], "must divide among the 2 ranks"),
    (["--dataset", "nope"], "dataset 'nope' is not prepared"),
    (["--metrics_file", "/proc/m.json"], "cannot be written"),
])
def test_bad_input_under_torchrun_is_refused_before_any_process_starts(
        override, message, data_dir, tmp_path, monkeypatch):
    from neuromanifold_gpt.launch import plan_run

    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match=re.escape(message)):
        plan_run(torchrun_params(data_dir, 2), "tiny", "checkpointed", tmp_path, override)
    assert list(tmp_path.iterdir()) == []


def test_a_torchrun_launch_ends_with_the_failed_ranks_line_and_exit_code(data_dir, tmp_path,
                                                                          monkeypatch, capsys):
    """A bad input that only the ranks can see (the model's size against the device): torchrun
    alone would print a ChildFailedError traceback after it and exit 1."""
    from neuromanifold_gpt.launch import plan_run, run_training

    monkeypatch.chdir(ROOT)
    run = plan_run(torchrun_params(data_dir, 2), "tiny", "checkpointed", tmp_path,
                   ["--n_embd", "1048576"])
    assert run_training(run) == 2
    out = capsys.readouterr().out
    assert out == run.log.read_text() and "Traceback" not in out
    assert out.splitlines()[-1].startswith("error: the model can never fit")


@pytest.mark.parametrize("where", ["callback", "forward"])
def test_an_oom_on_one_rank_ends_every_rank_at_once_with_exit_3(where, tiny_args, tmp_path):
    """Rank 1 runs out of memory at step 2: after the step (the ranks agree, rank 0 writes the
    record, both exit 3) or inside its forward (rank 0 waits in DDP's all-reduce, which no
    agreement can reach: rank 1 writes the record and leaves; rank 0's collective fails)."""
    from neuromanifold_gpt.launch import PlannedRun, run_training

    metrics = tmp_path / "m.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "oom_on_rank_1.py"), where, *tiny_args, "--max_iters", "6",
               "--gradient_accumulation_steps", "2", "--metrics_file", str(metrics)]
    start = time.monotonic()
    status = run_training(PlannedRun(command, tmp_path / "log", metrics))
    assert time.monotonic() - start < 120  # dist_timeout is 600 s
    assert status == 3  # torchrun itself exits 1
    record = json.loads(metrics.read_text())
    assert record["oom"] is True and "(rank 1)" in record["error"]
    log = (tmp_path / "log").read_text()
    assert log.count("error: CUDA out of memory") == (2 if where == "callback" else 1)
