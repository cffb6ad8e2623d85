"""The CPU's peak memory: tensor storage counted op by op, exact and repeatable, with the
process's resident set beside it."""

import json

import pytest
import torch

from neuromanifold_gpt import build_model, memory
from neuromanifold_gpt.config.base import TrainConfig
from neuromanifold_gpt.config.cli import parse_args
from neuromanifold_gpt.memory import GIB, MemoryMonitorCallback, TensorMemory
from neuromanifold_gpt.optim import make_optimizer
from neuromanifold_gpt.trainer import Trainer, plan_run, train

MIB = 2**20


def test_the_count_follows_allocations_and_frees_byte_for_byte():
    before = torch.ones(MIB // 4)  # made before counting: counts once an op reads it
    with TensorMemory() as tensors:
        x = torch.ones(MIB // 4)  # 1 MiB of fp32
        assert tensors.current == MIB
        y = x * 2
        view = y.view(2, -1)  # same storage: nothing more
        assert tensors.current == 2 * MIB
        z = y + before
        assert tensors.current == 4 * MIB
        del y, view
        assert tensors.current == 3 * MIB  # freed when the last tensor on it went
        tensors.reset_peak()
        assert tensors.peak == 3 * MIB
        del x, z
    assert tensors.current == MIB and tensors.peak == 3 * MIB


def test_the_counted_step_peak_equals_torchs_own_tracker():
    """One training step of a small model, counted by TensorMemory and by torch's MemTracker
    (which is told of the model and optimizer up front): the same peak."""
    from torch.distributed._tools.mem_tracker import MemTracker

    cfg = TrainConfig.from_flags(preset="gpt2", n_layer=2, n_embd=64, n_head=2, batch_size=4,
                                 block_size=64, gradient_checkpointing=True)
    torch.manual_seed(0)
    model = build_model(cfg.model_config(100, 64))
    optimizer = make_optimizer(model, cfg.optimizer, cfg.memory_levers, torch.device("cpu"))
    x = torch.randint(0, 100, (4, 64))

    def step():
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tensors = TensorMemory()
    with tensors:
        step()  # sees the parameters, makes the optimizer state
    tensors.reset_peak()
    with tensors:
        step()
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    assert tensors.peak == tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_a_runs_cpu_peak_repeats_exactly_and_checkpointing_lowers_it(tiny_args, tmp_path):
    wider = tiny_args + ["--n_embd", "64", "--batch_size", "16", "--block_size", "64",
                         "--max_iters", "3"]
    runs = {}
    for name, flags in (("a", []), ("b", []), ("block", ["--gradient_checkpointing", "true"])):
        path = tmp_path / f"{name}.json"
        train(parse_args(wider + flags + ["--metrics_file", str(path)]), quiet=True)
        runs[name] = json.loads(path.read_text())
    assert runs["a"]["peak_memory_source"] == memory.TENSOR_SOURCE
    assert runs["a"]["peak_memory_gb"] == runs["b"]["peak_memory_gb"]  # no load, no allocator in it
    assert runs["block"]["peak_memory_gb"] < 0.8 * runs["a"]["peak_memory_gb"]
    assert runs["a"]["peak_rss_gb"] > runs["a"]["peak_memory_gb"]  # RSS kept beside it


def test_a_compiled_cpu_run_is_not_counted(tiny_args):
    """Dynamo does not trace under a dispatch mode: counting would run the model eagerly."""
    cfg = parse_args(tiny_args + ["--compile", "true"])
    trainer = Trainer(cfg, *plan_run(cfg), quiet=True)
    assert trainer.memory.tensors is None and trainer.memory.source == memory.RSS_SOURCE


def test_the_log_line_names_each_cpu_figure():
    monitor = MemoryMonitorCallback(torch.device("cpu"))
    with monitor.counting():
        x = torch.ones(64 * MIB // 4)
    monitor.on_warmup_end()
    del x
    record = {}
    monitor.on_log(record)
    assert set(record) == {"memory/cpu_tensor_gb", "memory/cpu_max_tensor_gb",
                           "memory/cpu_peak_rss_gb"}
    assert record["memory/cpu_tensor_gb"] == 0.0
    assert record["memory/cpu_max_tensor_gb"] == pytest.approx(64 * MIB / GIB)
    assert record["memory/cpu_peak_rss_gb"] > record["memory/cpu_max_tensor_gb"]
