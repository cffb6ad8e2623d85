"""DVC stage: one training run of one model size, as params.yaml describes it.

    python3 stages/train.py SIZE baseline|checkpointed

Runs the package's trainer (`python -m neuromanifold_gpt`) with the size's config file and
params.yaml's `train`, `sizes.SIZE` and (for the checkpointed run) `checkpointing` sections,
resolved for the device it lands on. Writes
metrics/train/SIZE/RUN.json, plots/train/SIZE/RUN.tsv (memory per step) and logs/SIZE/RUN.log.
A CUDA out-of-memory is a result, not a failure: the metrics say oom: true and the verify
stage judges it."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed copy

from neuromanifold_gpt.errors import EXIT_OOM, entry_point
from neuromanifold_gpt.launch import plan_run, run_training
from neuromanifold_gpt.params import RUNS, load_params


@entry_point
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("size", help="a key of params.yaml's sizes")
    parser.add_argument("run", choices=RUNS)
    args = parser.parse_args(argv)
    run = plan_run(load_params("train", "sizes", "checkpointing"), args.size, args.run)
    status = run_training(run)  # train.nproc > 1: through torchrun
    return 0 if status == EXIT_OOM else status  # an OOM is a result: its metrics say oom: true


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
