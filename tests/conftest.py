import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from neuromanifold_gpt.data import CORPUS_ENV, write_dataset

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys) -> str:
    """stderr of a refused run: one `error:` line, no traceback."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err

# Small enough to train in a second on 2 cores, big enough for activations to dominate memory.
TINY = ["--preset", "shakespeare_char", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
        "--batch_size", "4", "--block_size", "32", "--eval_iters", "2", "--log_interval", "1",
        "--warmup_iters", "2", "--device", "cpu"]


@pytest.fixture(scope="session")
def corpus() -> Path:
    """Tiny shakespeare's input.txt from $NEUROMANIFOLD_CORPUS, for the tests of nanoGPT's
    published counts. Missing, it skips those tests, except under CI=true, where it fails."""
    value = os.environ.get(CORPUS_ENV)
    if value and Path(value).is_file():
        return Path(value)
    message = f"tiny shakespeare not given: set {CORPUS_ENV}=/path/to/input.txt"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> tuple[Path, str]:
    """A 60 kB text of our own and its sha256: for tests that need a corpus, not that one."""
    words = np.array("to be or not that is the question whether tis nobler in mind".split())
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=10)) for _ in range(1200)]
    path = tmp_path_factory.mktemp("corpus") / "input.txt"
    path.write_text("\n".join(lines) + "\n")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A prepared dataset 'tiny' of random tokens (vocab 65) in a temporary data_dir."""
    root = tmp_path_factory.mktemp("data")
    ids = np.random.default_rng(0).integers(0, 65, size=20_000)
    write_dataset(root / "tiny", ids, {"vocab_size": 65})
    return root


@pytest.fixture
def dataset(data_dir, tmp_path) -> Path:
    """A private copy of the tiny dataset, free to damage."""
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    return copy


@pytest.fixture(scope="session")
def tiny_args(data_dir) -> list[str]:
    return TINY + ["--data_dir", str(data_dir), "--dataset", "tiny"]


class Exploit:
    """A pickle that, once loaded, makes the folder `marker`: proof that a file ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones too), with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def snapshot_dir(tiny_args, tmp_path_factory) -> Path:
    """A run folder holding the snapshot of a two-step tiny run."""
    import train

    out = tmp_path_factory.mktemp("snap")
    assert train.main(tiny_args + ["--max_iters", "2", "--eval_interval", "2", "--save_snapshot",
                                   "true", "--out_dir", str(out)]) == 0
    return out


def plan_of(cfg, vocab: int, device: str = "cpu", dtype=None, world: int = 1, fsdp: bool = False):
    """The Plan a run of cfg resolves to on `device` (no machine measured: the batch is cfg's)."""
    import torch

    from neuromanifold_gpt.distributed import DistInfo
    from neuromanifold_gpt.planner import resolve

    parallelism = "fsdp" if fsdp else "ddp" if world > 1 else "none"
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    return resolve(cfg, vocab, torch.device(device), dtype, DistInfo(0, 0, world, parallelism))
