"""Where figures come from: the hardware and software that measure (the pipeline's
metrics/hardware.json, an input of every training stage) and the code that trained (commit,
dirty flag and a hash of the training code, recorded in each run's metrics).

The training code is single-sourced from dvc.yaml: the deps of the training stages, less the
outputs of other stages (data, metrics/hardware.json) and the per-size config."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import torch
import yaml

from .device import device_name, resolve_device

ROOT = Path(__file__).resolve().parents[1]  # the checkout this package runs from
HARDWARE_FILE = "metrics/hardware.json"
TRAINING_STAGE = "train_baseline"  # its deps (shared with train_checkpointed) are the training code
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


def _code_entries(root: Path) -> list[str]:
    """The training stages' deps in dvc.yaml that are code (not another stage's output)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    produced = {next(iter(o)) if isinstance(o, dict) else o
                for stage in stages.values() for kind in ("outs", "metrics", "plots")
                for o in (stage.get("do", stage).get(kind) or [])}
    deps = stages[TRAINING_STAGE]["do"]["deps"]
    return [d for d in deps if "${" not in d and d not in produced]


def code_files(root: Path = ROOT, entries: list[str] | None = None) -> list[Path]:
    """entries: _code_entries(root), when the caller has already read them."""
    files = []
    for entry in _code_entries(root) if entries is None else entries:
        path = root / entry
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        files += [p for p in found if not any(part in IGNORED or p.suffix in IGNORED
                                              for part in p.relative_to(root).parts)]
    return files


def code_hash(root: Path = ROOT, entries: list[str] | None = None) -> str | None:
    """sha256 over the training code's paths and contents (None outside a checkout)."""
    if not (root / "dvc.yaml").is_file():
        return None
    h = hashlib.sha256()
    for path in code_files(root, entries):
        h.update(f"{path.relative_to(root).as_posix()}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def run_provenance(device: torch.device, root: Path = ROOT) -> dict:
    """A run's metrics keys on its origin; git_commit and git_dirty are None outside git.
    git_dirty: the training code differs from git_commit (the pipeline's own outputs always
    change during a run, so the whole tree's state would say nothing)."""
    entries = _code_entries(root) if (root / "dvc.yaml").is_file() else None
    commit = _git(root, "rev-parse", "HEAD")
    dirty = None
    if commit and entries is not None:
        status = _git(root, "status", "--porcelain", "--", *entries)
        dirty = None if status is None else bool(status.strip())
    return {"torch_version": torch.__version__,
            "git_commit": commit.strip() if commit else None, "git_dirty": dirty,
            "code_hash": code_hash(root, entries),
            "cuda_version": torch.version.cuda if device.type == "cuda" else None}
