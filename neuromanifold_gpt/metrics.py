"""Metrics files: written atomically (a crash never leaves half a file), read with a clear
error when missing or corrupt."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def write_tsv(path: str | Path, header: list[str], rows: list[tuple]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path, required: tuple[str, ...] = ()) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics file {path} is missing; run the training that writes it "
                         f"(dvc repro, or train.py --metrics_file {path})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"metrics file {path} is corrupt ({e}); delete it and re-run the "
                         f"training that writes it") from None
    if not isinstance(data, dict):
        raise ValueError(f"metrics file {path} is corrupt (not a JSON object); re-run the training")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"metrics file {path} lacks {', '.join(missing)}; re-run the training "
                         f"that writes it")
    return data
