"""Measured memory: the one place that reads peak memory, and the callback that logs it.

Two figures per device: the peak of what the training step allocates, and what the process
holds around it.

CUDA: the caching allocator's counters, `max_memory_allocated` and `max_memory_reserved`.
CPU: the bytes of tensor storage alive, counted op by op while a step runs (TensorMemory),
and the process's peak resident set (VmHWM in /proc/self/status, reset by writing 5 to
/proc/self/clear_refs). The resident set also carries the interpreter, malloc's retained
pages and whatever the machine's load makes malloc keep, so two runs of the same code differ
by more than checkpointing's saving on small models; the tensor count repeats exactly.
A run that compiles on the CPU is not counted (dynamo does not trace under a dispatch mode,
so counting would run it eagerly): its peak is the resident set's. Where the RSS reset fails
the source says so; without /proc the RSS peak is getrusage's lifetime one."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GIB = 1024**3
CUDA_SOURCE = "torch.cuda.max_memory_allocated"
TENSOR_SOURCE = "CPU tensor storage, counted op by op"
RSS_SOURCE = "process peak RSS (VmHWM)"


@dataclass
class MemoryReading:
    current_gb: float  # allocated now (CUDA) / tensor storage alive now (CPU, counted)
    reserved_gb: float  # held now: the CUDA caching allocator's reservation / the resident set
    peak_gb: float  # peak allocated (CUDA) / peak counted tensor storage (CPU) since the reset
    peak_reserved_gb: float  # peak held: max_memory_reserved (CUDA) / peak RSS (CPU)
    source: str  # where current_gb and peak_gb come from


class TensorMemory(TorchDispatchMode):
    """Bytes of CPU tensor storage alive, as seen by every op run while it is entered.

    A storage counts from the first op that creates or reads it until Python frees it (a weak
    reference's callback), so tensors made before counting began (parameters, optimizer
    state) count once an op touches them: after one counted step, everything a step uses."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, tuple[weakref.ref, int]] = {}  # id(storage): (ref, bytes)
        self.events: list[tuple[float, int]] | None = None  # set to a list: (µs, bytes +/-) appended

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for t in _tensors((args, kwargs.values(), out if isinstance(out, (list, tuple)) else (out,))):
            self._see(t)
        self.peak = max(self.peak, self.current)
        return out

    def _see(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu" or t.is_sparse or t.is_mkldnn:
            return
        storage = t.untyped_storage()
        key, nbytes = id(storage), storage.nbytes()
        known = self._live.get(key)
        if known is not None and known[1] == nbytes:
            return
        # resize_ changes a storage's size in place: count the difference
        self._add(nbytes - (known[1] if known else 0))
        ref = known[0] if known else weakref.ref(storage, lambda _, k=key: self._free(k))
        self._live[key] = (ref, nbytes)

    def _free(self, key: int) -> None:
        self._add(-self._live.pop(key)[1])

    def _add(self, delta: int) -> None:
        self.current += delta
        if self.events is not None:
            self.events.append((time.perf_counter_ns() / 1000, delta))


def _tensors(groups):
    """The tensors among the ops' arguments and results (a tensor, or a list of them)."""
    for group in groups:
        for x in group:
            if isinstance(x, torch.Tensor):
                yield x
            elif isinstance(x, (list, tuple)):
                yield from (y for y in x if isinstance(y, torch.Tensor))


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False  # not Linux, or /proc read-only: the peak stays the lifetime one


def reset_peak(device: torch.device, tensors: TensorMemory | None = None) -> bool:
    """Start the peaks afresh; False when the held figure's peak cannot be reset (it is then
    the lifetime one)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    if tensors is not None:
        tensors.reset_peak()
    return _reset_cpu_peak()


def lifetime(source: str) -> str:
    """A source whose RSS peak could not be reset, named as what it then is."""
    if "lifetime" in source:
        return source
    return f"{source}, lifetime peak: reset failed" if source.startswith(RSS_SOURCE) else \
        f"{source}; its RSS peak is the lifetime one: reset failed"


def measure(device: torch.device, tensors: TensorMemory | None = None) -> MemoryReading:
    """Current and peak memory of this process on `device`, in GiB; on the CPU the counted
    tensor storage when `tensors` is given, else the resident set."""
    if device.type == "cuda":
        return MemoryReading(
            torch.cuda.memory_allocated(device) / GIB, torch.cuda.memory_reserved(device) / GIB,
            torch.cuda.max_memory_allocated(device) / GIB,
            torch.cuda.max_memory_reserved(device) / GIB, CUDA_SOURCE)
    rss, hwm = _proc_status_kb("VmRSS"), _proc_status_kb("VmHWM")
    if rss is None or hwm is None:  # not Linux: lifetime peak only
        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
        rss_gb = hwm_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / GIB
        source = "getrusage ru_maxrss (lifetime peak RSS)"
    else:
        rss_gb, hwm_gb, source = rss / 1024**2, hwm / 1024**2, RSS_SOURCE
    if tensors is None:
        return MemoryReading(rss_gb, rss_gb, hwm_gb, hwm_gb, source)
    return MemoryReading(tensors.current / GIB, rss_gb, tensors.peak / GIB, hwm_gb, TENSOR_SOURCE)


class MemoryMonitorCallback:
    """Tracks the peaks of every step and logs memory every log_interval.

    CUDA logs memory/gpu_allocated_gb, memory/gpu_reserved_gb, memory/gpu_max_allocated_gb
    (peak since the previous log line); CPU logs memory/cpu_tensor_gb,
    memory/cpu_max_tensor_gb (counted, peak since the previous log line) and
    memory/cpu_peak_rss_gb (likewise). The run's peaks count only steps after warm-up, when
    the optimizer state exists. `count_tensors`: count CPU tensor storage while `counting()`
    is entered (not for a compiled run)."""

    def __init__(self, device: torch.device, count_tensors: bool = True):
        self.device = device
        self.tensors = TensorMemory() if device.type == "cpu" and count_tensors else None
        self.trace: list[tuple[int, float, float]] = []  # (iter, step peak, peak held), GiB
        self.peak_gb = self.peak_reserved_gb = 0.0
        self.interval_peak_gb = self.interval_peak_reserved_gb = 0.0
        self.source = measure(device, self.tensors).source

    def counting(self) -> contextlib.AbstractContextManager:
        """Around each training step: where the CPU's tensor storage is counted."""
        return self.tensors if self.tensors is not None else contextlib.nullcontext()

    def reset(self) -> None:
        if not reset_peak(self.device, self.tensors):
            self.source = lifetime(self.source)

    def _interval(self, m: MemoryReading) -> None:
        self.interval_peak_gb = max(self.interval_peak_gb, m.peak_gb)
        self.interval_peak_reserved_gb = max(self.interval_peak_reserved_gb, m.peak_reserved_gb)

    def on_warmup_end(self) -> None:
        self._interval(measure(self.device, self.tensors))  # logged, not counted in the run's peaks
        self.reset()

    def on_step_end(self, iter_num: int) -> None:
        m = measure(self.device, self.tensors)
        self.trace.append((iter_num, m.peak_gb, m.peak_reserved_gb))
        self.peak_gb = max(self.peak_gb, m.peak_gb)
        self.peak_reserved_gb = max(self.peak_reserved_gb, m.peak_reserved_gb)
        self._interval(m)
        self.reset()

    def on_log(self, record: dict) -> None:
        m = measure(self.device, self.tensors)
        if self.device.type == "cuda":
            record["memory/gpu_allocated_gb"] = m.current_gb
            record["memory/gpu_reserved_gb"] = m.reserved_gb
            record["memory/gpu_max_allocated_gb"] = self.interval_peak_gb
        else:
            if self.tensors is not None:
                record["memory/cpu_tensor_gb"] = m.current_gb
                record["memory/cpu_max_tensor_gb"] = self.interval_peak_gb
            record["memory/cpu_peak_rss_gb"] = self.interval_peak_reserved_gb
        self.interval_peak_gb = self.interval_peak_reserved_gb = 0.0
