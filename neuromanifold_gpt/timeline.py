"""Memory against time within one training step (forward, backward, optimizer).

Which step: a run that replays CUDA graphs records the step that captures them, the first
after warm-up. On later steps the graphs replay from their own memory pool, which the
allocator no longer counts, so their curve would stay far below the run's peak; the capturing
step allocates every tensor through the allocator and reaches it. Recording adds its cost to
that one step's time, which capturing already makes the slowest measured step; the run reports
the median. Every other run, and a CUDA-graph run with no step after warm-up, records one more
step after the measured ones, so that recording touches none of the run's step times or peaks.
Recording begins at the step's first phase and ends with it.

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
    """Records one training step (the module's docstring says which) and writes its timeline
    when the run ends, so that a run stopped before its end leaves an earlier file as it was.
    close() ends a recording that an error left open."""

    def __init__(self, path: str | Path):
        self.path = path
        self.trainer = None
        self.recording: _Recording | None = None
        self.rows: list[tuple] | None = None  # the recorded step's

    def on_train_begin(self, trainer) -> None:
        self.trainer = trainer

    def on_warmup_end(self) -> None:
        if self.trainer.plan.cuda_graphs:  # the next step captures the graphs
            self.recording = _Recording(self.trainer)

    def on_step_end(self, iter_num: int) -> None:
        if self.recording is not None and self.rows is None:
            self.rows = self.recording.stop()

    def on_train_end(self, trainer) -> None:
        if self.rows is None:  # no CUDA graphs, or no step after warm-up: one more step
            self.close()
            self.recording = _Recording(trainer)
            trainer.train_step()
            self.rows = self.recording.stop()
        if trainer.dist.is_main:
            write_timeline(self.path, self.rows)

    def close(self) -> None:
        if self.recording is not None:
            self.recording.stop()


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
    """Every allocation and free on the trainer's device from the next step's first phase
    until stop(), with the time each phase began (the trainer's on_phase; with gradient
    accumulation, forward and backward once per micro-step)."""

    def __init__(self, trainer):
        self.trainer, self.device = trainer, trainer.device
        self.marks: list[tuple[float, str]] = []
        self.events: list[tuple[float, int]] = []
        self.start: int | None = None  # bytes allocated when recording began
        self.rows: list[tuple] | None = None
        self.before, trainer.on_phase = trainer.on_phase, self.phase

    def phase(self, name: str) -> None:
        if self.start is None:
            self._begin()
        # the allocator stamps its events in wall-clock µs (its approximate clock in Unix time)
        now = time.time_ns() if self.device.type == "cuda" else time.perf_counter_ns()
        self.marks.append((now / 1000, name))

    def _begin(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            torch.cuda.memory._record_memory_history("all", context=None, device=self.device)
        else:
            # a compiled run counts nothing itself
            self.tensors = self.trainer.memory.tensors or TensorMemory()
            self.start, self.tensors.events = self.tensors.current, self.events
            self.tensors.__enter__()

    def stop(self) -> list[tuple]:
        """Stop recording (again: nothing more); the timeline's rows, none if no step began."""
        if self.rows is not None:
            return self.rows
        self.trainer.on_phase = self.before
        self.rows = []
        if self.start is None:
            return self.rows
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
                trace = torch.cuda.memory._snapshot(self.device)["device_traces"][self.device.index or 0]
            finally:
                torch.cuda.memory._record_memory_history(None, device=self.device)
            sign = {"alloc": 1, "free_completed": -1}
            self.events = [(e["time_us"], sign[e["action"]] * e["size"])
                           for e in trace if e["action"] in sign]
        else:
            self.tensors.__exit__(None, None, None)
            self.tensors.events = None
        self.rows = timeline_rows(self.events, self.marks, self.start)
        return self.rows
