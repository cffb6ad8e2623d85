"""DVC stage: one training run of one model size, as params.yaml describes it.

    python3 stages/train.py SIZE baseline|checkpointed

Runs train.py with the size's config file and params.yaml's `train`, `sizes.SIZE` and (for
the checkpointed run) `checkpointing` sections, resolved for the device it lands on. Writes
metrics/train/SIZE/RUN.json, plots/train/SIZE/RUN.tsv (memory per step) and logs/SIZE/RUN.log.
A CUDA out-of-memory is a result, not a failure: the metrics say oom: true and the verify
stage judges it."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed copy

from neuromanifold_gpt.pipeline import (
    EXIT_OOM,
    RUNS,
    load_params,
    processes,
    run_device_type,
    run_files,
    run_training,
    training_args,
)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("size", help="a key of params.yaml's sizes")
    parser.add_argument("run", choices=RUNS)
    args = parser.parse_args(argv)
    try:
        params = load_params("train", "sizes", "checkpointing")
        files = run_files(args.size, args.run)
        device_type = run_device_type(params)
        train_args = training_args(params, args.size, args.run, device_type, files)
        nproc = processes(params, device_type)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    status = run_training(train_args, files["log"], nproc)  # nproc > 1: through torchrun
    return 0 if status == EXIT_OOM else status  # an OOM is a result: its metrics say oom: true


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
