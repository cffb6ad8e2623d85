"""Data-parallel training on CPU (gloo, 2 ranks): DDP and FSDP2 train exactly like one process
with the same global batch, under every checkpointing policy; a failed or hung rank ends the run.

Most runs fork 2 ranks with torch.multiprocessing (the environment torchrun would give them, no
interpreter start-up per rank); the end-to-end and failure tests launch train.py through torchrun.

Tolerance: losses and weights agree with the single-process run to 1e-5 (relative). The ranks
all-reduce the gradient sum of their micro-batches where the single process adds them one by one,
so the two differ only in floating-point rounding (measured: 1e-7, one float32 step). Skipping the
all-reduce, or running it on the first micro-step instead of the last, puts the losses off by
1e-2 and 5e-3 (tried)."""

import itertools
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import train as cli
from neuromanifold_gpt.config.cli import parse_args
from neuromanifold_gpt.data import BatchLoader
from neuromanifold_gpt.launch import training_command
from neuromanifold_gpt.model import NeuroManifoldGPT
from neuromanifold_gpt.params import processes, run_files, training_args
from neuromanifold_gpt.trainer import Trainer, plan_run, train
from tests.conftest import ROOT

RTOL = 1e-5
WORLD = 2
# 4 micro-steps per iteration: 2 per rank, so DDP's no_sync path runs; no dropout, so the only
# randomness is the data, which the reference below reproduces exactly.
RUN = ["--gradient_accumulation_steps", "4", "--dropout", "0", "--decay_lr", "false",
       "--warmup_iters", "0", "--learning_rate", "1e-2", "--eval_interval", "100", "--max_iters", "4"]


@pytest.fixture(scope="module")
def args(tiny_args) -> list[str]:
    return tiny_args + RUN


@pytest.fixture(scope="module")
def reference(args):
    """One process, the same global batch: rank r reads its own stream (seed + r), so micro-step
    k here takes the next batch of stream k % 2, the batches the two ranks train on together."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks
    cfg = parse_args(args)
    trainer = Trainer(cfg, *plan_run(cfg), quiet=True)
    trainer.build()
    streams = [trainer.loader.get_batch] + [
        BatchLoader(cfg.data.data_dir, cfg.data.dataset, trainer.batch_size, trainer.block_size,
                    trainer.device, seed=cfg.system.seed + r).get_batch for r in range(1, WORLD)]
    turn, own = itertools.cycle(streams), trainer.loader.get_batch
    trainer.loader.get_batch = lambda split: next(turn)(split) if split == "train" else own(split)
    record, losses = trainer.run()
    torch.set_num_threads(threads)
    metrics = record.as_json() | {"losses": [loss for _, loss in losses]}
    metrics["state"] = trainer.model.state_dict()
    return metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, port, argv, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    metrics = train(parse_args(argv), quiet=True)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(metrics, f)


def run_ranks(argv, tmp_path) -> list[dict]:
    """Train with WORLD ranks forked from a fork server; every rank's returned metrics."""
    # Not plain fork: a child forked from this process, whose OpenMP threads have run, can hang
    # in its first parallel region (libgomp is not fork-safe). The fork server is a fresh
    # interpreter that imports torch and the package once and, on one thread, never starts a
    # thread pool; its children start in a blink.
    mp.get_context("forkserver").set_forkserver_preload(["neuromanifold_gpt.trainer"])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # read when the fork server starts
        mp.start_processes(_rank_main, args=(_free_port(), argv, str(tmp_path)), nprocs=WORLD,
                           start_method="forkserver")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def assert_same_training(metrics, reference, start=0):
    assert metrics["losses"] == pytest.approx(reference["losses"][start:], rel=RTOL)
    assert metrics["final_val_loss"] == pytest.approx(reference["final_val_loss"], rel=RTOL)


@pytest.mark.parametrize("policy", ["none", "block", "attention", "mlp", "selective"])
def test_ddp_trains_like_one_process_under_every_policy(args, reference, tmp_path, policy):
    ck = [] if policy == "none" else ["--gradient_checkpointing", "true", "--checkpoint_policy", policy]
    ranks = run_ranks(args + ck, tmp_path)
    for m in ranks:  # every rank reports the global loss
        assert m["parallelism"] == "ddp" and m["world_size"] == WORLD and m["policy"] == policy
        assert_same_training(m, reference)
    m = ranks[0]
    assert len(m["peak_memory_gb_per_rank"]) == WORLD and min(m["peak_memory_gb_per_rank"]) > 0
    assert m["peak_memory_gb"] == max(m["peak_memory_gb_per_rank"])
    assert m["tokens_per_iter"] == reference["tokens_per_iter"] == 4 * 4 * 32


def test_fsdp_block_trains_like_one_process_and_resumes(args, reference, tmp_path):
    fsdp = args + ["--fsdp", "true", "--gradient_checkpointing", "true", "--out_dir",
                   str(tmp_path / "out"), "--save_snapshot", "true"]
    first = run_ranks(fsdp + ["--max_iters", "2"], tmp_path)[0]
    assert first["parallelism"] == "fsdp" and first["policy"] == "block"
    assert first["losses"] == pytest.approx(reference["losses"][:2], rel=RTOL)
    resumed = run_ranks(fsdp + ["--init_from", "resume"], tmp_path)[0]
    assert resumed["iters"] == 4
    assert_same_training(resumed, reference, start=2)
    # the snapshot holds full tensors under the model's own names: a plain model loads it
    state = torch.load(tmp_path / "out" / "snapshot.pt", weights_only=True)
    assert len(state["rng"]) == WORLD
    model = NeuroManifoldGPT(plan_run(parse_args(args))[0].model)
    model.load_state_dict(state["model"])
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, reference["state"][name], rtol=RTOL, atol=1e-6)


def test_resume_with_another_world_size_is_a_clear_error(args, tmp_path):
    out = ["--out_dir", str(tmp_path / "out")]
    run_ranks(args + out + ["--max_iters", "1", "--save_snapshot", "true"], tmp_path)
    with pytest.raises(ValueError, match="written by 2 process"):
        train(parse_args(args + out + ["--init_from", "resume"]), quiet=True)


def test_bad_distributed_settings_are_clear_errors(args, monkeypatch, capsys):
    assert cli.main(args + ["--fsdp", "true"]) == 2
    assert "fsdp=true needs a torchrun launch" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert cli.main(args) == 2  # refused before joining any process group
    assert "gradient_accumulation_steps=4 is the global count" in capsys.readouterr().err


def test_pipeline_runs_through_torchrun_above_one_process():
    params = {"train": {"device": "cpu", "nproc": {"cpu": 1, "cuda": 2}},
              "sizes": {"tiny": {"config": "config/train_shakespeare_char.py"}}}
    assert processes(params, "cpu") == 1 and processes(params, "cuda") == 2
    args = training_args(params, "tiny", "baseline", "cuda", run_files("tiny", "baseline"))
    assert "--device=cpu" in args and not any(a.startswith("--nproc") for a in args)
    assert training_command(args, 2)[1:7] == ["-m", "neuromanifold_gpt.launch", "--standalone",
                                              "--nproc_per_node=2", "-m", "neuromanifold_gpt"]
    assert training_command(args, 1)[1:] == ["-m", "neuromanifold_gpt", *args]
    with pytest.raises(ValueError, match="train.nproc=0 must be a whole number"):
        processes({"train": {"nproc": 0}}, "cpu")


def torchrun(argv, timeout=120, script="train.py"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", script, *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return p, time.perf_counter() - t0


def test_torchrun_end_to_end(args, reference, tmp_path):
    metrics_file = tmp_path / "run.json"
    p, _ = torchrun(args + ["--metrics_file", str(metrics_file)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("iter 3: loss") == 1  # only rank 0 logs
    assert "distributed: DDP over 2 rank(s), 2 micro-step(s) of 4 x 32 per rank" in p.stdout
    m = json.loads(metrics_file.read_text())
    assert m["world_size"] == WORLD and len(m["peak_memory_gb_per_rank"]) == WORLD
    assert m["last_step_loss"] == pytest.approx(reference["losses"][-1], rel=RTOL)
    assert m["final_val_loss"] == pytest.approx(reference["final_val_loss"], rel=RTOL)


# Rank 1 breaks inside its second training step while rank 0 waits for it in the all-reduce.
FAULTY = """import os, runpy, sys, time
from neuromanifold_gpt.trainer import Trainer
step = Trainer.train_step
def faulty(self):
    if self.dist.rank == 1 and self.iter_num == 1:
        {action}
    return step(self)
Trainer.train_step = faulty
sys.argv[0] = {train!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("action", ["raise RuntimeError('rank 1 lost its data')", "time.sleep(300)"])
def test_a_failed_rank_ends_the_run(args, tmp_path, action):
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY.format(action=action, train=str(ROOT / "train.py")))
    p, seconds = torchrun(args + ["--dist_timeout", "5"], script=str(script))
    assert p.returncode != 0
    out = p.stdout + p.stderr
    if action.startswith("raise"):  # torchrun stops rank 0 and shows rank 1's error
        assert "RuntimeError: rank 1 lost its data" in out
    else:  # rank 1 hangs: rank 0's all-reduce times out and the run ends
        assert "timed out" in out.lower() or "timeout" in out.lower()
    assert seconds < 60
