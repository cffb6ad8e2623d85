"""train.py whose rank 1 runs out of CUDA memory at step 2 (simulated): after the step
(`callback`) or inside its forward (`forward`)."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package

from neuromanifold_gpt.config.cli import parse_args
from neuromanifold_gpt.errors import entry_point
from neuromanifold_gpt.model import NeuroManifoldGPT
from neuromanifold_gpt.trainer import train

WHERE = sys.argv.pop(1)
RANK = int(os.environ["RANK"])


def oom(iter_num):
    if RANK == 1 and iter_num == 2:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (rank 1)")


class AfterTheStep:
    def on_step_end(self, iter_num):
        oom(iter_num)


if WHERE == "forward":
    calls = {"n": 0}
    forward = NeuroManifoldGPT.forward

    def failing_forward(self, *args, **kwargs):
        if self.training:
            calls["n"] += 1
            oom(calls["n"] - 1)
        return forward(self, *args, **kwargs)

    NeuroManifoldGPT.forward = failing_forward


@entry_point
def main(argv):
    train(parse_args(argv), callbacks=[AfterTheStep()] if WHERE == "callback" else [])
    return 0


sys.exit(main(sys.argv[1:]))
