"""Where figures come from: the hardware and software that measure (the pipeline's
metrics/hardware.json, an input of every training stage) and the code that trained (commit,
dirty flag and a hash of the training code, recorded in each run's metrics).

The code is the package's own files: wherever it is installed, the hash says what trained."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import torch

from .device import device_name, resolve_device

PACKAGE = Path(__file__).resolve().parent
HARDWARE_FILE = "metrics/hardware.json"
IGNORED = ("__pycache__", ".pyc")  # as .dvcignore: bytecode never makes code look changed


def hardware(cfg) -> dict:
    """What measures a run of the System section `cfg`; nothing that varies between runs on one
    machine."""
    device, dtype = resolve_device(cfg)
    cuda = device.type == "cuda"
    return {"device": device.type, "device_name": device_name(device),
            "device_count": torch.cuda.device_count() if cuda else 1,
            "torch_version": torch.__version__, "cuda_version": torch.version.cuda if cuda else None,
            "dtype": str(dtype).replace("torch.", "")}


def describe(hw: dict) -> str:
    cuda = f", CUDA {hw['cuda_version']}" if hw.get("cuda_version") else ""
    count = f" x{hw['device_count']}" if hw.get("device_count", 1) > 1 else ""
    return f"{hw['device_name']}{count}, torch {hw['torch_version']}{cuda}"


def hardware_news(hw: dict, figures: list[dict]) -> str:
    """In plain words: does this machine match the one that measured `figures` (run metrics)?"""
    here = f"measuring on: {describe(hw)}, {hw['dtype']}"
    if not figures:
        return f"{here}; metrics/ holds no figures yet: every size is measured"
    other = [f for f in figures if (f.get("device_name"), f.get("torch_version"))
             != (hw["device_name"], hw["torch_version"])]
    if not other:
        return (f"{here}, the same as the figures in metrics/: stages whose inputs did not change "
                f"keep their figures (`dvc repro --force` measures again)")
    return f"{here}; the figures in metrics/ were measured on {describe(other[0])}: every size is re-measured"


def code_files(package: Path = PACKAGE) -> list[Path]:
    """The package's own files, bytecode aside: the code a run trains with."""
    return sorted(p for p in package.rglob("*") if p.is_file()
                  and not any(part in IGNORED or p.suffix in IGNORED for part in p.parts))


def code_hash(package: Path = PACKAGE) -> str:
    """sha256 over the package's file paths and contents."""
    h = hashlib.sha256()
    for path in code_files(package):
        h.update(f"{path.relative_to(package).as_posix()}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def run_provenance(device: torch.device, package: Path = PACKAGE) -> dict:
    """A run's metrics keys on its origin. git_commit and git_dirty are those of the checkout
    the package sits in (None when it sits in none, as an installed copy does); git_dirty: the
    package differs from git_commit (the pipeline's own outputs always change during a run, so
    the whole tree's state would say nothing)."""
    commit = _git(package, "rev-parse", "HEAD")
    dirty = None
    if commit:
        status = _git(package, "status", "--porcelain", "--", ".")
        dirty = None if status is None else bool(status.strip())
    return {"torch_version": torch.__version__,
            "git_commit": commit.strip() if commit else None, "git_dirty": dirty,
            "code_hash": code_hash(package),
            "cuda_version": torch.version.cuda if device.type == "cuda" else None}
