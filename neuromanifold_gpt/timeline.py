"""Memory against time within one training step (forward, backward, optimizer), recorded on
an extra step after the measured ones so that recording never touches the run's step times
or peaks.

CUDA: the caching allocator's history (torch.cuda.memory._record_memory_history, no stack
traces). CPU: the tensor count that measures the run's peak (memory.TensorMemory), which also
runs no profiler (whose start and stop kineto logs on every run). Both give every allocation
and free with its time; the curve starts from the memory allocated when the step begins, so
its top is the step's peak. A compiled CPU run's recorded step runs eagerly (dynamo does not
trace under the counting dispatch mode)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from .files import write_tsv
from .memory import GIB, TensorMemory

HEADER = ["time_ms", "allocated_gb", "phase"]
PHASES = ("forward", "backward", "optimizer")


class StepTimelineCallback:
    """Records one more train_step after the run (on_train_end) and writes its timeline."""

    def __init__(self, path: str | Path):
        self.path = path

    def on_train_end(self, trainer) -> None:
        record = _record_cuda if trainer.device.type == "cuda" else _record_cpu
        events, marks, start = record(trainer)
        if trainer.dist.is_main:
            write_timeline(self.path, timeline_rows(events, marks, start))


def write_timeline(path: str | Path, rows: list[tuple]) -> None:
    """The timeline TSV; header only for a run that recorded no step (out of memory)."""
    write_tsv(path, HEADER, rows)


def timeline_rows(events: list[tuple[float, int]], marks: list[tuple[float, str]],
                  start: int = 0) -> list[tuple]:
    """(time_ms, allocated GiB, phase) from (time in µs, bytes +/-) events, the times at
    which each phase began (`marks`) and the bytes allocated before the first event (`start`),
    relative to the first event."""
    marks, total, rows = sorted(marks), start, []
    for t, delta in sorted(events):
        total += delta
        phase = next((p for m, p in reversed(marks) if m <= t), PHASES[0])  # before: data loading
        rows.append(((t - events[0][0]) / 1000, total / GIB, phase))
    return rows


@contextlib.contextmanager
def _stamping(trainer, stamp):
    """stamp(phase) as each phase of the recorded step begins; with gradient accumulation,
    forward and backward once per micro-step."""
    before, trainer.on_phase = trainer.on_phase, stamp
    try:
        yield
    finally:
        trainer.on_phase = before


def _record_cuda(trainer):
    device = trainer.device
    marks: list[tuple[float, str]] = []
    # the allocator stamps events in wall-clock µs (its approximate clock converted to Unix time)
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history("all", context=None, device=device)
    try:
        with _stamping(trainer, lambda phase: marks.append((time.time_ns() / 1000, phase))):
            trainer.train_step()
        torch.cuda.synchronize(device)
        trace = torch.cuda.memory._snapshot(device)["device_traces"][device.index or 0]
    finally:
        torch.cuda.memory._record_memory_history(None, device=device)
    sign = {"alloc": 1, "free_completed": -1}
    events = [(e["time_us"], sign[e["action"]] * e["size"]) for e in trace if e["action"] in sign]
    return events, marks, start


def _record_cpu(trainer):
    tensors = trainer.memory.tensors or TensorMemory()  # a compiled run counts nothing itself
    marks: list[tuple[float, str]] = []
    events: list[tuple[float, int]] = []
    start, tensors.events = tensors.current, events
    try:
        with _stamping(trainer, lambda phase: marks.append((time.perf_counter_ns() / 1000, phase))), \
                tensors:
            trainer.train_step()
    finally:
        tensors.events = None
    return events, marks, start
