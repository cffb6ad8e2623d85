"""Files: output paths checked before any work, written atomically (a crash never leaves half
a file, a failed write never replaces the old one nor leaves the folders it made), JSON read
with bounded size and depth and a clear error when missing or corrupt, the download cache,
and sha256 checks.

A write's temporary file is named after the host and process writing it, so a later run
sweeps only the temporary files of writers that are gone (killed mid-write)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import BadInput

_KINDS = {stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink", stat.S_IFCHR: "device",
          stat.S_IFBLK: "device", stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket"}


def cache_dir() -> Path:
    return Path(os.environ.get("NEUROMANIFOLD_CACHE", Path.home() / ".cache" / "neuromanifold_gpt"))


# Files a run reads that are ours (metrics, reports, dataset metadata) are small; these bound
# what a damaged or hostile one can cost to parse.
JSON_MAX_BYTES = 64 * 2**20
JSON_MAX_DEPTH = 32
JSON_MAX_DIGITS = 40  # in an integer (past its own limit Python names neither file nor fix)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:  # in pieces: a file of any size hashes in constant memory
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def kind(mode: int) -> str:
    """What a stat mode that is not a regular file's is, in words."""
    return _KINDS.get(stat.S_IFMT(mode), "special file")


def _refuse_non_regular(path: Path, what: str) -> None:
    """An existing target must be a regular file: replacing a symlink, device or FIFO would
    destroy something that is not ours."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (yet) to replace
        return
    if not stat.S_ISREG(mode):
        raise BadInput(f"{what} {path} is a {kind(mode)}, not a regular file; give the path "
                         f"of a file to write")


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


def _host() -> str:
    """This machine, as a temporary file's name gives it: out_dir may be shared by several."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale_temps(*paths: str | Path) -> None:
    """Remove the temporary files atomic_path left beside each path when its writer was killed
    (SIGKILL) mid-write: only those written on this host by a process that is gone. Another
    run's write in progress, another host's, and any file not named as atomic_path names its
    temporary files stay."""
    host = _host()
    for path in map(Path, paths):
        pattern = re.compile(rf"\.{re.escape(path.name)}\.{host}-(\d+)\.[a-z0-9_]+"
                             rf"{re.escape(path.suffix)}")
        if not path.parent.is_dir():
            continue
        for entry in os.scandir(path.parent):
            match = pattern.fullmatch(entry.name)
            if match and entry.is_file(follow_symlinks=False) and not _alive(int(match[1])):
                Path(entry.path).unlink(missing_ok=True)


@contextlib.contextmanager
def new_folder(folder: Path) -> Iterator[None]:
    """Make folder and its missing parents; if the block fails, remove again those of them that
    are still empty, so that a failed write leaves no trace."""
    made = []
    parent = folder
    while not os.path.lexists(parent):
        made.append(parent)  # innermost first
        parent = parent.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        for path in made:
            with contextlib.suppress(OSError):  # not empty (another writer's), or never made
                path.rmdir()
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; it replaces `path` only if the block succeeds.
    A failed write (a full disk) is one BadInput naming the file; the old file stays, and the
    folders made for the new one go."""
    path = Path(path)
    _refuse_non_regular(path, "output")
    with new_folder(path.parent):
        try:
            # named after its writer (sweep_stale_temps), with the same suffix, so writers that
            # pick a format by extension (savefig) still do
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix,
                                       prefix=f".{path.name}.{_host()}-{os.getpid()}.")
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
            raise BadInput(f"could not write {path} ({e.strerror or e}); free some space or "
                             f"choose another path (the previous file, if any, is unchanged)") from None
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


def _depth(data) -> int:
    """How deep lists and objects nest in parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def _int(text: str) -> int:
    if len(text.lstrip("-")) > JSON_MAX_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-')):,} digits")
    return int(text)


def parse_json(path: Path, what: str, fix: str):
    """The JSON in a file, parsed within JSON_MAX_BYTES, JSON_MAX_DEPTH and JSON_MAX_DIGITS;
    anything else is one BadInput that names the file (as `what`), what is wrong with it and
    `fix`."""
    try:
        size = os.stat(path).st_size
        if size > JSON_MAX_BYTES:
            problem = f"{size:,} bytes, more than the {JSON_MAX_BYTES:,} such a file holds"
        else:
            with open(path, encoding="utf-8") as f:
                data = json.loads(f.read(), parse_int=_int)
            deep = _depth(data) > JSON_MAX_DEPTH
            problem = f"nested more than {JSON_MAX_DEPTH} deep" if deep else ""
    except RecursionError:  # the parser's own depth limit, below the interpreter's stack
        problem = f"nested more than {JSON_MAX_DEPTH} deep"
    except MemoryError:
        problem = "too large to parse"
    except OSError as e:
        raise BadInput(f"{what} {path} cannot be read ({e.strerror or e}); {fix}") from None
    except ValueError as e:  # JSON syntax, UTF-8, an integer too long
        problem = str(e)
    if problem:
        raise BadInput(f"{what} {path} is corrupt ({problem}); {fix}")
    return data


def read_json(path: str | Path, required: tuple[str, ...] = (), what: str = "metrics file",
              writer: str = "") -> dict:
    """A JSON object from a file that a run of ours wrote; errors name the file as `what` and
    say to run `writer` (by default the training that writes a metrics file)."""
    path = Path(path)
    writer = writer or f"the training that writes it (dvc repro, or train.py --metrics_file {path})"
    if not path.is_file():
        raise BadInput(f"{what} {path} is missing; run {writer}")
    data = parse_json(path, what, f"delete it and run {writer}")
    if not isinstance(data, dict):
        raise BadInput(f"{what} {path} is corrupt (not a JSON object); run {writer}")
    missing = [k for k in required if k not in data]
    if missing:
        raise BadInput(f"{what} {path} lacks {', '.join(missing)}; run {writer}")
    return data
