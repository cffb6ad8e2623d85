"""Train a GPT, nanoGPT style, with optional activation checkpointing.

    python3 train.py --config config/train_shakespeare_char.py --max_iters 10 --gradient_checkpointing true
    python3 train.py --config config/train_gpt2.py --checkpoint_policy selective --batch_size 16

The same as `python3 -m neuromanifold_gpt`: every field of TrainConfig's sections
(neuromanifold_gpt/config/base.py) can be set as --key value or --key=value; later ones win.
Exit codes: 0 done, 2 bad input, 3 CUDA out of memory, 4 the loss became non-finite, 130
interrupted (Ctrl-C or SIGTERM)."""

import sys

from neuromanifold_gpt.__main__ import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
