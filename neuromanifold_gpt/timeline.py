"""Memory against time within one training step (forward, backward, optimizer), recorded on
an extra step after the measured ones so that recording never touches the run's step times
or peaks.

CUDA: the caching allocator's history (torch.cuda.memory._record_memory_history, no stack
traces). CPU: the profiler's memory events (torch.profiler, profile_memory=True). Both give
every allocation and free with its time; the curve is memory allocated since the step began."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

from .files import write_tsv
from .memory import GIB

HEADER = ["time_ms", "allocated_gb", "phase"]
PHASES = ("forward", "backward", "optimizer")


class StepTimelineCallback:
    """Records one more train_step after the run (on_train_end) and writes its timeline."""

    def __init__(self, path: str | Path):
        self.path = path

    def on_train_end(self, trainer) -> None:
        record = _record_cuda if trainer.device.type == "cuda" else _record_cpu
        events, marks = record(trainer)
        if trainer.dist.is_main:
            write_timeline(self.path, timeline_rows(events, marks))


def write_timeline(path: str | Path, rows: list[tuple]) -> None:
    """The timeline TSV; header only for a run that recorded no step (out of memory)."""
    write_tsv(path, HEADER, rows)


def timeline_rows(events: list[tuple[float, int]], marks: list[tuple[float, str]]) -> list[tuple]:
    """(time_ms, allocated GiB, phase) from (time in µs, bytes +/-) events and the times at
    which each phase began (`marks`), relative to the first event."""
    marks, total, rows = sorted(marks), 0, []
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
    return events, marks


def _record_cpu(trainer):
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    def stamp(phase: str) -> None:  # a zero-length profiler range: stamped in the profiler's clock
        with record_function(f"timeline: {phase}"):
            pass

    with _stamping(trainer, stamp), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step()
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace_path))
        trace = json.loads(trace_path.read_text())["traceEvents"]
    events = [(e["ts"], e["args"]["Bytes"]) for e in trace if e.get("name") == "[memory]"]
    marks = [(e["ts"], e["name"].partition(": ")[2]) for e in trace
             if e.get("name", "").startswith("timeline: ")]
    return events, marks
