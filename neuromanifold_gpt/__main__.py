"""Train a GPT, nanoGPT style, with optional activation checkpointing.

    python3 -m neuromanifold_gpt --config config/train_shakespeare_char.py --gradient_checkpointing true
    python3 train.py ...   (the same, from a checkout)

Every field of TrainConfig's sections (neuromanifold_gpt/config/base.py) can be set as --key
value or --key=value; later ones win. Exit codes (neuromanifold_gpt/errors.py): 0 done, 2 bad
input, 3 CUDA out of memory, 4 the loss became non-finite, 130 interrupted (Ctrl-C or SIGTERM)."""

import sys

from neuromanifold_gpt.config.cli import parse_args
from neuromanifold_gpt.errors import entry_point
from neuromanifold_gpt.trainer import train


@entry_point
def main(argv: list[str]) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
