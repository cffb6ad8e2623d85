"""Memory against time within one training step (forward, backward, optimizer).

Which step: a run that replays CUDA graphs records the step that captures them, the first
after warm-up. On later steps the graphs replay from their own memory pool, which the
allocator no longer counts, so their curve would stay far below the run's peak; the capturing
step allocates every tensor through the allocator and reaches it. Recording adds its cost to
that one step's time, which capturing already makes the slowest measured step; the run reports
the median. Every other run records one more step after the measured ones, so that recording
touches none of the run's step times or peaks.

CUDA: the caching allocator's history (torch.cuda.memory._record_memory_history, no stack
traces). CPU: the tensor count that measures the run's peak (memory.TensorMemory), which also
runs no profiler (whose start and stop kineto logs on every run). Both give every allocation
and free with its time; the curve starts from the memory allocated when the step begins, so
its top is the step's peak. A compiled CPU run's recorded step runs eagerly (dynamo does not
trace under the counting dispatch mode)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .files import write_tsv
from .memory import GIB, TensorMemory

HEADER = ["time_ms", "allocated_gb", "phase"]
PHASES = ("forward", "backward", "optimizer")


class StepTimelineCallback:
    """Records one training step (see the module's docstring for which) and writes its
    timeline."""

    def __init__(self, path: str | Path):
        self.path = path
        self.trainer = None
        self.recording: _Recording | None = None  # under way since the warm-up step
        self.steps_seen = 0

    def on_train_begin(self, trainer) -> None:
        self.trainer = trainer

    def on_warmup_end(self) -> None:
        if self.trainer.plan.cuda_graphs:  # the next step captures the graphs
            self.recording = _Recording(self.trainer)

    def on_step_end(self, iter_num: int) -> None:
        if self.recording is not None and not self.steps_seen:
            self.steps_seen = 1
            self._write(self.recording.stop())

    def on_train_end(self, trainer) -> None:
        if self.steps_seen:
            return
        if self.recording is not None:  # no step after warm-up: what it saw was evaluation
            self.recording.stop()
        recording = _Recording(trainer)
        try:
            trainer.train_step()
        finally:
            rows = recording.stop()
        self._write(rows)

    def _write(self, rows: list[tuple]) -> None:
        if self.trainer.dist.is_main:
            write_timeline(self.path, rows)


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


class _Recording:
    """Every allocation and free on the trainer's device from now until stop(), with the time
    each phase of a step began (the trainer's on_phase; with gradient accumulation, forward
    and backward once per micro-step)."""

    def __init__(self, trainer):
        self.trainer, self.device = trainer, trainer.device
        self.marks: list[tuple[float, str]] = []
        self.before = trainer.on_phase
        if self.device.type == "cuda":
            # the allocator stamps events in wall-clock µs (its approximate clock in Unix time)
            trainer.on_phase = lambda phase: self.marks.append((time.time_ns() / 1000, phase))
            torch.cuda.synchronize(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            torch.cuda.memory._record_memory_history("all", context=None, device=self.device)
        else:
            trainer.on_phase = lambda phase: self.marks.append((time.perf_counter_ns() / 1000, phase))
            self.tensors = trainer.memory.tensors or TensorMemory()  # a compiled run counts nothing itself
            self.events: list[tuple[float, int]] = []
            self.start, self.tensors.events = self.tensors.current, self.events
            self.tensors.__enter__()

    def stop(self) -> list[tuple]:
        """Stop recording; the timeline's rows."""
        self.trainer.on_phase = self.before
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
                trace = torch.cuda.memory._snapshot(self.device)["device_traces"][self.device.index or 0]
            finally:
                torch.cuda.memory._record_memory_history(None, device=self.device)
            sign = {"alloc": 1, "free_completed": -1}
            events = [(e["time_us"], sign[e["action"]] * e["size"]) for e in trace if e["action"] in sign]
        else:
            self.tensors.__exit__(None, None, None)
            self.tensors.events, events = None, self.events
        return timeline_rows(events, self.marks, self.start)
