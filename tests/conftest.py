import os
from pathlib import Path

import numpy as np
import pytest

from neuromanifold_gpt.data import write_dataset

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("TINYSHAKESPEARE", ROOT.parent / "shared/data/tinyshakespeare/input.txt"))

# Small enough to train in a second on 2 cores, big enough for activations to dominate memory.
TINY = ["--preset", "shakespeare_char", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
        "--batch_size", "4", "--block_size", "32", "--eval_iters", "2", "--log_interval", "1",
        "--warmup_iters", "2", "--device", "cpu"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A prepared dataset 'tiny' of random tokens (vocab 65) in a temporary data_dir."""
    root = tmp_path_factory.mktemp("data")
    ids = np.random.default_rng(0).integers(0, 65, size=20_000)
    write_dataset(root / "tiny", ids, {"vocab_size": 65})
    return root


@pytest.fixture(scope="session")
def tiny_args(data_dir) -> list[str]:
    return TINY + ["--data_dir", str(data_dir), "--dataset", "tiny"]
