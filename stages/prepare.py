"""DVC stage: prepare every dataset the model sizes train on.

    python3 stages/prepare.py

Reads params.yaml's `data` section: the corpus comes from `url` through the download cache,
or, offline, from the file NEUROMANIFOLD_CORPUS names; either way it must match `sha256`.
Writes data/shakespeare_char (one token per character) and data/shakespeare (GPT-2 BPE)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed copy

from neuromanifold_gpt import data
from neuromanifold_gpt.errors import BadInput, entry_point
from neuromanifold_gpt.params import load_params


@entry_point
def main() -> int:
    params = load_params("data")["data"]
    missing = [k for k in ("url", "sha256") if not params.get(k)]
    if missing:
        raise BadInput(f"params.yaml data lacks {', '.join(missing)}; restore it from git")
    for name in data.PREPARERS:
        status = data.main([name, "--source", params["url"], "--sha256", params["sha256"]])
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
