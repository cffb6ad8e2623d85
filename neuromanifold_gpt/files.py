"""Files: output paths checked before any work, written atomically (a crash never leaves half
a file, and a failed write never replaces the old one), metrics read with a clear error when
missing or corrupt, the download cache, and sha256 checks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import BadInput

_KINDS = {stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink", stat.S_IFCHR: "device",
          stat.S_IFBLK: "device", stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket"}


def cache_dir() -> Path:
    return Path(os.environ.get("NEUROMANIFOLD_CACHE", Path.home() / ".cache" / "neuromanifold_gpt"))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _refuse_non_regular(path: Path, what: str) -> None:
    """An existing target must be a regular file: replacing a symlink, device or FIFO would
    destroy something that is not ours."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (yet) to replace
        return
    if not stat.S_ISREG(mode):
        raise BadInput(f"{what} {path} is a {_KINDS.get(stat.S_IFMT(mode), 'special file')}, "
                         f"not a regular file; give the path of a file to write")


def check_output(path: str | Path, what: str) -> None:
    """Refuse, before any work, an output that could not be written: a target that is not a
    regular file or is read-only, a parent that is a file, a folder we may not write in."""
    path = Path(path)
    _refuse_non_regular(path, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise BadInput(f"{what} {path} is read-only; make it writable or choose another path")
    folder = path.parent
    while not os.path.lexists(folder):  # the folders still to be made go in the nearest existing one
        folder = folder.parent
    if not folder.is_dir():
        raise BadInput(f"{what} {path} cannot be written: {folder} is a file, not a folder; "
                         f"choose another path")
    try:  # a probe, not os.access: it also sees read-only mounts and works the same as root
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.probe.")
    except OSError as e:
        raise BadInput(f"{what} {path} cannot be written ({e.strerror}: {folder}); choose a "
                         f"writable path") from None
    os.close(fd)
    os.unlink(probe)


def check_outputs(outputs: dict[str, str | Path]) -> None:
    """check_output for each {what: path} that is set; two outputs may not share a path."""
    seen: dict[Path, str] = {}
    for what, path in outputs.items():
        if not path:
            continue
        check_output(path, what)
        key = Path(os.path.abspath(path))
        if key in seen:
            raise BadInput(f"{seen[key]} and {what} are both {path}; give each its own file")
        seen[key] = what


def sweep_stale_temps(path: str | Path) -> None:
    """Remove the temporary files atomic_path left beside `path` when a process was killed
    (SIGKILL) mid-write."""
    path = Path(path)
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*{path.suffix}"):
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; it replaces `path` only if the block succeeds.
    A failed write (a full disk) is one ValueError naming the file; the old file stays."""
    path = Path(path)
    _refuse_non_regular(path, "output")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # same suffix, so writers that pick a format by extension (savefig) still do
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    except OSError as e:
        raise BadInput(f"cannot write {path} ({e.strerror}); choose a writable path") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the result from other readers
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise BadInput(f"could not write {path} ({e.strerror or e}); free some space or choose "
                         f"another path (the previous file, if any, is unchanged)") from None
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


def read_json(path: str | Path, required: tuple[str, ...] = (), what: str = "metrics file",
              writer: str = "") -> dict:
    """A JSON object from a file that a run of ours wrote; errors name the file as `what` and
    say to run `writer` (by default the training that writes a metrics file)."""
    path = Path(path)
    writer = writer or f"the training that writes it (dvc repro, or train.py --metrics_file {path})"
    if not path.is_file():
        raise BadInput(f"{what} {path} is missing; run {writer}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{what} {path} is corrupt ({e}); delete it and run {writer}") from None
    except ValueError:  # an integer of more digits than Python converts
        raise BadInput(f"{what} {path} is corrupt (a number with too many digits); delete it and "
                       f"run {writer}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{what} {path} is corrupt (not a JSON object); run {writer}")
    missing = [k for k in required if k not in data]
    if missing:
        raise BadInput(f"{what} {path} lacks {', '.join(missing)}; run {writer}")
    return data
