"""Outputs: checked before the first step, written whole or not at all, other writers' temporary
files left alone, snapshots that load only what a run writes, and an interrupt that writes nothing."""

import errno
import os
import pickle
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from neuromanifold_gpt import files
from tests.conftest import ROOT, TINY, Exploit, one_line_error, tree


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
