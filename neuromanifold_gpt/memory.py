"""Measured memory: the one place that reads peak memory, and the callback that logs it.

CUDA: the caching allocator's counters (`max_memory_allocated` / `max_memory_reserved`).
CPU: the process's peak resident set (VmHWM in /proc/self/status), reset by writing 5 to
/proc/self/clear_refs; where the reset fails the source says the peak is the lifetime one, and
without /proc it is getrusage's lifetime peak (not resettable)."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch

GIB = 1024**3


@dataclass
class MemoryReading:
    current_gb: float  # allocated now (CUDA) / resident now (CPU)
    reserved_gb: float  # held by the CUDA caching allocator (CPU: same as current)
    peak_gb: float  # peak allocated (CUDA) / peak resident (CPU) since the last reset
    peak_reserved_gb: float
    source: str  # where the figures come from


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


def reset_peak(device: torch.device) -> bool:
    """Start the peak afresh; False when that is impossible (the peak is then the lifetime one)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return _reset_cpu_peak()


def lifetime(source: str) -> str:
    """A source whose peak could not be reset, named as what it then is."""
    return source if "lifetime" in source else f"{source}, lifetime peak: reset failed"


def measure(device: torch.device) -> MemoryReading:
    """Current and peak memory of this process on `device`, in GiB."""
    if device.type == "cuda":
        return MemoryReading(
            torch.cuda.memory_allocated(device) / GIB, torch.cuda.memory_reserved(device) / GIB,
            torch.cuda.max_memory_allocated(device) / GIB,
            torch.cuda.max_memory_reserved(device) / GIB, "torch.cuda.max_memory_allocated")
    rss, hwm = _proc_status_kb("VmRSS"), _proc_status_kb("VmHWM")
    if rss is None or hwm is None:  # not Linux: lifetime peak only
        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / GIB
        return MemoryReading(peak, peak, peak, peak, "getrusage ru_maxrss (lifetime peak RSS)")
    rss_gb, hwm_gb = rss / 1024**2, hwm / 1024**2
    return MemoryReading(rss_gb, rss_gb, hwm_gb, hwm_gb, "process peak RSS (VmHWM)")


class MemoryMonitorCallback:
    """Tracks the peak of every step and logs memory every log_interval.

    CUDA logs memory/gpu_allocated_gb, memory/gpu_reserved_gb, memory/gpu_max_allocated_gb
    (peak since the previous log line); CPU logs memory/cpu_rss_gb and memory/cpu_peak_rss_gb.
    The run's peak (`peak_gb`) counts only steps after warm-up, when the optimizer state exists."""

    def __init__(self, device: torch.device):
        self.device = device
        self.trace: list[tuple[int, float, float]] = []  # (iter, step peak GiB, reserved GiB)
        self.peak_gb = self.peak_reserved_gb = self.interval_peak_gb = 0.0
        self.source = measure(device).source

    def reset(self) -> None:
        if not reset_peak(self.device):
            self.source = lifetime(self.source)

    def on_warmup_end(self) -> None:
        self.interval_peak_gb = measure(self.device).peak_gb  # logged, not counted in peak_gb
        self.reset()

    def on_step_end(self, iter_num: int) -> None:
        m = measure(self.device)
        self.trace.append((iter_num, m.peak_gb, m.peak_reserved_gb))
        self.peak_gb = max(self.peak_gb, m.peak_gb)
        self.peak_reserved_gb = max(self.peak_reserved_gb, m.peak_reserved_gb)
        self.interval_peak_gb = max(self.interval_peak_gb, m.peak_gb)
        self.reset()

    def on_log(self, record: dict) -> None:
        m = measure(self.device)
        if self.device.type == "cuda":
            record["memory/gpu_allocated_gb"] = m.current_gb
            record["memory/gpu_reserved_gb"] = m.reserved_gb
            record["memory/gpu_max_allocated_gb"] = self.interval_peak_gb
        else:
            record["memory/cpu_rss_gb"] = m.current_gb
            record["memory/cpu_peak_rss_gb"] = self.interval_peak_gb
        self.interval_peak_gb = 0.0
