"""Bad input and faults: every failure is one `error:` line with its exit code, checked before
the first step, and nothing is left half-written or replaced."""

import errno
import json
import os
import pickle
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from neuromanifold_gpt import files, memory, predictor, reporting, trainer
from neuromanifold_gpt.config.base import TrainConfig
from neuromanifold_gpt.data import write_dataset
from neuromanifold_gpt.errors import BadInput
from tests.conftest import ROOT, TINY, one_line_error, plan_of


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones too), with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- data ------------------------------------------------------------------------------------
class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


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


# -- outputs, checked before the first step ---------------------------------------------------
def bad_outputs(tmp_path: Path) -> dict:
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    (tmp_path / "link").symlink_to(a_file)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    device = tmp_path / "null"  # a device node of our own: /dev/null is shared
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:  # not root: the system's own, untouched by a refused write
        device = Path("/dev/null")
    return {
        "a directory": (tmp_path / "dir", "is a directory"),
        "parent is a file": (a_file / "m.json", "is a file, not a folder"),
        "symlink": (tmp_path / "link", "is a symlink"),
        "fifo": (tmp_path / "fifo", "is a FIFO"),
        "device node": (device, "is a device"),
        "unwritable folder": (Path("/proc/m.json"), "cannot be written"),
    }


def run_refused(argv, tmp_path, capsys) -> str:
    """train.py with argv must fail before its first step, writing and replacing nothing."""
    before = tree(tmp_path)
    assert train.main(argv) == 2
    err = one_line_error(capsys)
    assert "iter 0" not in capsys.readouterr().out
    assert tree(tmp_path) == before and (tmp_path / "link").is_symlink()
    return err


@pytest.mark.parametrize("case", ["a directory", "parent is a file", "symlink", "fifo",
                                  "device node", "unwritable folder"])
@pytest.mark.parametrize("flag", ["metrics_file", "memory_trace_file"])
def test_bad_output_paths_fail_before_the_first_step(case, flag, tiny_args, tmp_path, capsys):
    path, message = bad_outputs(tmp_path)[case]
    good = {"metrics_file": tmp_path / "ok" / "m.json", "memory_trace_file": tmp_path / "ok" / "t.tsv"}
    outputs = good | {flag: path}
    argv = tiny_args + ["--max_iters", "2", "--save_snapshot", "true", "--out_dir", str(tmp_path / "ok")]
    argv += [a for k, v in outputs.items() for a in (f"--{k}", str(v))]
    assert message in run_refused(argv, tmp_path, capsys)


@pytest.mark.parametrize("case, message", [("a file", "is a file, not a folder"),
                                           ("snapshot.pt a directory", "is a directory"),
                                           ("unwritable", "cannot be written")])
def test_a_bad_out_dir_fails_before_the_first_step(case, message, tiny_args, tmp_path, capsys):
    bad_outputs(tmp_path)
    out_dir = {"a file": tmp_path / "a_file", "snapshot.pt a directory": tmp_path,
               "unwritable": Path("/proc/out")}[case]
    (tmp_path / "snapshot.pt").mkdir()
    argv = tiny_args + ["--max_iters", "2", "--save_snapshot", "true", "--out_dir", str(out_dir),
                        "--metrics_file", str(tmp_path / "ok" / "m.json")]
    assert message in run_refused(argv, tmp_path, capsys)


def test_two_outputs_may_not_share_a_file(tiny_args, tmp_path, capsys):
    same = str(tmp_path / "x")
    assert train.main(tiny_args + ["--metrics_file", same, "--memory_trace_file", same]) == 2
    assert "both" in one_line_error(capsys)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_atomic_path_never_replaces_what_is_not_a_regular_file(kind, tmp_path):
    target = tmp_path / "target"
    if kind == "symlink":
        (tmp_path / "real").write_text("real")
        target.symlink_to(tmp_path / "real")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    before = (os.lstat(target).st_mode, sorted(os.listdir(tmp_path)))
    with pytest.raises(ValueError, match=f"(?i)is a {kind}"):
        files.write_json(target, {"a": 1})
    assert (os.lstat(target).st_mode, sorted(os.listdir(tmp_path))) == before


@pytest.mark.parametrize("raised, expected, match", [
    (RuntimeError("mid-write"), RuntimeError, "mid-write"),  # published nothing
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), ValueError,  # a full disk: one line
     "could not write .*No space left on device"),
], ids=["raises", "full disk"])
def test_a_failed_write_publishes_nothing_and_the_old_file_stays(raised, expected, match, tmp_path):
    path = tmp_path / "m.json"
    path.write_text("old")
    with pytest.raises(expected, match=match):
        with files.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise raised
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_a_failed_write_removes_the_folders_it_made(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError, match="No space left on device"):
        with files.atomic_path(tmp_path / "kept" / "out" / "sub" / "m.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert tree(tmp_path) == {} and (tmp_path / "kept").is_dir()


def test_a_snapshot_that_cannot_be_written_leaves_no_empty_out_dir(data_dir, tmp_path):
    """A real write past the file-size limit (as a full disk fails it), in a fresh process."""
    args = TINY + ["--data_dir", str(data_dir), "--dataset", "tiny", "--max_iters", "2",
                   "--eval_interval", "2", "--save_snapshot", "true", "--out_dir", "out/sub"]
    limit = 64 * 1024  # bytes: less than the snapshot, more than anything else the run writes

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, text=True,
                       capture_output=True, preexec_fn=small_files, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: could not write out/sub/snapshot.pt")
    assert list(tmp_path.iterdir()) == []


# -- temporary files of other writers ----------------------------------------------------------
WRITER = """import sys
from pathlib import Path
from neuromanifold_gpt.files import atomic_path
with atomic_path(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"written by another run")
    print(tmp, flush=True)
    sys.stdin.readline()  # writing, until told to finish
"""


def start_writer(path: Path) -> tuple[subprocess.Popen, Path]:
    """Another process in the middle of an atomic write of path: it and its temporary file."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return proc, Path(proc.stdout.readline().strip())


def killed_writers_temp(path: Path) -> Path:
    """The temporary file of a writer of path that was killed (SIGKILL) mid-write."""
    proc, temp = start_writer(path)
    proc.kill()
    proc.wait()
    assert temp.exists()
    return temp


def test_a_run_sweeps_only_the_temps_of_dead_writers_and_only_once_its_inputs_are_valid(
        tiny_args, tmp_path, capsys):
    out = tmp_path / "out"
    dead = killed_writers_temp(out / "snapshot.pt")
    live, temp = start_writer(out / "snapshot.pt")
    try:
        argv = tiny_args + ["--max_iters", "2", "--eval_interval", "2", "--save_snapshot", "true",
                            "--out_dir", str(out)]
        assert train.main(argv + ["--dataset", "nonexist"]) == 2  # bad input: no sweep at all
        assert "nonexist" in one_line_error(capsys)
        assert dead.exists() and temp.exists()
        assert train.main(argv) == 0
        assert not dead.exists() and temp.exists()  # the live run's write goes on
    finally:
        live.communicate("\n", timeout=60)
    assert live.returncode == 0
    assert (out / "snapshot.pt").read_bytes() == b"written by another run"
    assert sorted(os.listdir(out)) == ["snapshot.pt"]


# -- snapshots -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def snapshot_dir(tiny_args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("snap")
    assert train.main(tiny_args + ["--max_iters", "2", "--eval_interval", "2", "--save_snapshot",
                                   "true", "--out_dir", str(out)]) == 0
    return out


@pytest.fixture
def snapshot_copy(snapshot_dir, tmp_path) -> Path:
    """A private copy of the run folder holding snapshot.pt, free to damage."""
    out = tmp_path / "out"
    shutil.copytree(snapshot_dir, out)
    return out


@pytest.mark.parametrize("damage, message", [
    ("another model size", "holds another model (n_embd 32 vs 64)"),
    ("truncated", "is truncated or not a snapshot"),
    ("empty", "is empty"),
    ("garbage", "is truncated or not a snapshot"),
    ("a pickle of something else", "is truncated or not a snapshot"),
])
def test_a_bad_snapshot_is_one_line(damage, message, snapshot_copy, tiny_args, tmp_path, capsys):
    out = snapshot_copy
    snap, args = out / "snapshot.pt", tiny_args + ["--max_iters", "3", "--out_dir", str(out)]
    if damage == "another model size":
        args += ["--n_embd", "64"]
    elif damage == "truncated":
        snap.write_bytes(snap.read_bytes()[:5000])
    elif damage == "empty":
        snap.write_bytes(b"")
    elif damage == "garbage":
        snap.write_bytes(os.urandom(4096))
    else:
        snap.write_bytes(pickle.dumps(Exploit(tmp_path / "pwned")))
    capsys.readouterr()
    assert train.main(args + ["--init_from", "resume"]) == 2
    err = one_line_error(capsys)
    assert message in err and "weights_only" not in err
    assert not (tmp_path / "pwned").exists()


def nan_weight(state):
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name][0] = float("nan")
    return state


def negative_step(state):
    next(iter(state["optimizer"]["state"].values()))["step"].fill_(-5)
    return state


@pytest.mark.parametrize("damage, message", [
    (lambda s: s | {"iter_num": -100}, "holds step -100, not one in [0, 2]"),
    (lambda s: s | {"iter_num": 3}, "holds step 3, not one in [0, 2]"),
    (lambda s: s | {"iter_num": "2"}, "holds step '2'"),
    (lambda s: s | {"iter_num": True}, "holds step True"),
    (lambda s: s | {"config": {"max_iters": -1}}, "holds no valid config"),
    (lambda s: s | {"model": ["weights"]}, "holds no model state"),
    (lambda s: s | {"rng": [{"cpu": 1}]}, "holds no RNG states"),
    (lambda s: s | {"optimizer": {"state": [[[[[1]]]]]}}, "holds an optimizer state nested deeper"),
    (nan_weight, "holds a non-finite (NaN or infinite) transformer."),
    (negative_step, "holds a negative optimizer step"),
], ids=["step -100", "step past max_iters", "step a str", "step a bool", "config",
        "model", "rng", "deep optimizer state", "nan weight", "negative optimizer step"])
def test_a_snapshot_with_values_no_run_writes_is_refused(damage, message, snapshot_copy,
                                                         tiny_args, capsys):
    snap = snapshot_copy / "snapshot.pt"
    torch.save(damage(torch.load(snap, weights_only=True)), snap)
    argv = tiny_args + ["--max_iters", "3", "--out_dir", str(snapshot_copy), "--init_from", "resume"]
    assert train.main(argv) == 2
    err = one_line_error(capsys)
    assert f"snapshot {snap} {message}" in err


def test_a_snapshot_larger_than_its_model_can_write_is_not_loaded(snapshot_copy, tiny_args,
                                                                   monkeypatch, capsys):
    snap = snapshot_copy / "snapshot.pt"
    with open(snap, "ab") as f:
        f.truncate(snap.stat().st_size + 2**27)  # sparse: as large as the limit's spare room
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("loaded"))
    argv = tiny_args + ["--max_iters", "3", "--out_dir", str(snapshot_copy), "--init_from", "resume"]
    assert train.main(argv) == 2
    assert "more than a snapshot of this model can be" in one_line_error(capsys)


@pytest.mark.parametrize("raised, code, message", [
    # a full disk, as torch.save reports it
    (RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                  "file data/0: file write failed"), 2, "could not write"),
    (KeyboardInterrupt(), 130, "interrupted"),  # what SIGTERM becomes (errors.entry_point)
], ids=["full disk", "interrupt"])
def test_a_failed_save_keeps_the_old_snapshot_and_sweeps_stale_temps(
        raised, code, message, snapshot_copy, tiny_args, monkeypatch, capsys):
    out = snapshot_copy
    old = (out / "snapshot.pt").read_bytes()
    killed_writers_temp(out / "snapshot.pt")

    def failing_save(obj, path):
        Path(path).write_bytes(b"partial")
        raise raised

    monkeypatch.setattr(torch, "save", failing_save)
    assert train.main(tiny_args + ["--max_iters", "2", "--eval_interval", "2", "--save_snapshot",
                                   "true", "--out_dir", str(out)]) == code
    assert message in one_line_error(capsys)
    assert (out / "snapshot.pt").read_bytes() == old and sorted(os.listdir(out)) == ["snapshot.pt"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_run_is_one_line_exit_130_and_writes_nothing(signum, data_dir, tmp_path):
    args = ["--data_dir", str(data_dir), "--dataset", "tiny", "--device", "cpu", "--n_layer", "2",
            "--n_head", "2", "--n_embd", "32", "--batch_size", "4", "--block_size", "32",
            "--max_iters", "100000", "--log_interval", "1", "--eval_interval", "100000",
            "--metrics_file", str(tmp_path / "m.json"), "--memory_trace_file", str(tmp_path / "t.tsv")]
    # as from a terminal: a shell without job control starts background jobs with SIGINT ignored,
    # and Python keeps that
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith("iter 2:"):
            break
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.startswith("error: interrupted") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


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
