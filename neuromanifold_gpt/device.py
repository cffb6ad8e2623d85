"""The device and dtype a run trains on, and the device's name as reports and metrics give it."""

from __future__ import annotations

import torch

from .config.base import System
from .errors import BadInput


def resolve_device(cfg: System) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BadInput(f"device={cfg.device} but CUDA is not available; use --device cpu "
                             f"or --device auto")
    if cfg.dtype == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if use_bf16 else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({_cpu_model()}{platform.machine()}, {torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    """The CPU's model name and a comma (Linux), so other CPUs read as other hardware."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model}, " if model else ""
