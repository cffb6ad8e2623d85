"""Files: written atomically (a crash never leaves half a file), metrics read with a clear
error when missing or corrupt, the download cache, and sha256 checks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("NEUROMANIFOLD_CACHE", Path.home() / ".cache" / "neuromanifold_gpt"))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # same suffix, so writers that pick a format by extension (savefig) still do
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the result from other readers
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, data: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def write_tsv(path: str | Path, header: list[str], rows: list[tuple]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + "\n")


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
