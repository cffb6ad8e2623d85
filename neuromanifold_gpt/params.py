"""params.yaml, read: its sections, the device the runs land on, and train.py's arguments
for the baseline and the checkpointed run of each model size (launch.py starts them).

A params.yaml value written {cpu: A, cuda: B} means A on CPU and B on CUDA, for the device
the runs land on; a `verify` value may further be {SIZE: value, ...} per model size."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml

from .config.base import ActivationCheckpoint

DEVICES = ("cpu", "cuda")
RUNS = ("baseline", "checkpointed")
# what params.yaml's `checkpointing:` (the checkpointed run only) may set
CHECKPOINTING_KEYS = ("gradient_checkpointing", *(f.name for f in fields(ActivationCheckpoint)))


def load_params(*sections: str, path: str | Path = "params.yaml") -> dict:
    """params.yaml, checked to have the sections the caller reads."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found; run from the project root or pass --params FILE")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    for section in sections:
        if not isinstance((params or {}).get(section), dict):
            raise ValueError(f"{path} has no `{section}:` section; restore it from git")
    return params


def pick(value, device_type: str, size: str | None = None):
    """A params value, narrowed to this device ({cpu: .., cuda: ..}) and then to this size."""
    if isinstance(value, dict) and value and set(value) <= set(DEVICES):
        if device_type not in value:
            raise ValueError(f"params.yaml value {value} has no `{device_type}:` entry; add one")
        value = value[device_type]
    if size is not None and isinstance(value, dict):
        if size not in value:
            raise ValueError(f"params.yaml value {value} has no entry for size {size!r}; add one")
        value = value[size]
    return value


def run_device_type(params: dict) -> str:
    """'cuda' or 'cpu': where the runs land (train.device: auto picks CUDA when there is one,
    as device.resolve_device does; train.py itself rejects a device it cannot use)."""
    device = str(params["train"].get("device", "auto"))
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.partition(":")[0]


def run_files(size: str, run: str, root: str | Path = ".") -> dict[str, Path]:
    """Where one run's metrics (JSON), memory per step (TSV) and log go."""
    root = Path(root)
    return {"metrics": root / "metrics" / "train" / size / f"{run}.json",
            "trace": root / "plots" / "train" / size / f"{run}.tsv",
            "log": root / "logs" / size / f"{run}.log"}


def _arg(key: str, value) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"--{key}={'none' if value is None else value}"


def training_args(params: dict, size: str, run: str, device_type: str,
                  files: dict[str, Path]) -> list[str]:
    """train.py's arguments for one run: the size's config file, then params.yaml's `train`,
    `sizes.SIZE` and (checkpointed run) `checkpointing` sections, later ones winning."""
    if size not in params["sizes"]:
        raise ValueError(f"size {size!r} is not in params.yaml's sizes ({', '.join(params['sizes'])})")
    settings = dict(params["sizes"][size] or {})
    if "config" not in settings:
        raise ValueError(f"params.yaml sizes.{size} has no `config:` (e.g. config/train_gpt2.py)")
    args = ["--config", str(settings.pop("config"))]
    checkpointing = (params["checkpointing"] if run == "checkpointed"
                     else {"gradient_checkpointing": False})
    other = [k for k in checkpointing if k not in CHECKPOINTING_KEYS]
    if other:  # a lever set for one run only would be credited to checkpointing
        raise ValueError(f"params.yaml checkpointing: may set only {', '.join(CHECKPOINTING_KEYS)}; "
                         f"move {', '.join(other)} to train: (both runs)")
    for section in (params["train"], settings, checkpointing):
        args += [_arg(k, pick(v, device_type)) for k, v in section.items() if k != "nproc"]
    return args + [_arg("metrics_file", files["metrics"]), _arg("memory_trace_file", files["trace"])]


def processes(params: dict, device_type: str) -> int:
    """params.yaml's train.nproc: processes per run (default 1)."""
    nproc = pick(params["train"].get("nproc", 1), device_type)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"params.yaml train.nproc={nproc!r} must be a whole number >= 1")
    return nproc
