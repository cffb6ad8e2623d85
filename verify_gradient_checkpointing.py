"""Verify that activation checkpointing saves memory without changing training: run a
baseline and a checkpointed training of one model size, compare them, print RESULTS.

    python3 verify_gradient_checkpointing.py                   # shakespeare_char
    python3 verify_gradient_checkpointing.py --size gpt2 --max_iters 5 --checkpoint_policy mlp

Both runs take params.yaml's settings for the size, exactly as the DVC pipeline's runs do,
each in a fresh train.py process; any further --key value (a TrainConfig field) goes to both.
Metrics, memory traces and logs go under --out. Exit status: 0 passed, 1 failed (a run
crashed, memory was not saved, or the losses differ), 2 bad input."""

import argparse
import sys

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
from neuromanifold_gpt.verify import report, verify_pairs

# Set per run by this script; an override would break the pairing.
RESERVED = ("gradient_checkpointing", "metrics_file", "memory_trace_file")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="shakespeare_char", help="a key of params.yaml's sizes")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="out/verify", help="folder for the runs' files")
    args, overrides = parser.parse_known_args(argv)
    try:
        reserved = [a for a in overrides if a.lstrip("-").partition("=")[0] in RESERVED]
        if reserved:
            raise ValueError(f"{reserved[0]} is set by this script for each run; drop it")
        params = load_params("train", "sizes", "checkpointing", "verify", path=args.params)
        device_type = run_device_type(params)
        runs = {run: run_files(args.size, run, args.out) for run in RUNS}
        commands = {run: training_args(params, args.size, run, device_type, files) + overrides
                    for run, files in runs.items()}
        nproc = processes(params, device_type)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for run, files in runs.items():
        status = run_training(commands[run], files["log"], nproc)
        if status == 2:  # train.py has said what was wrong with the settings
            return 2
        if status not in (0, EXIT_OOM):
            print(f"VERIFICATION FAILED ✗: the {run} run exited with status {status} "
                  f"(its log: {files['log']})")
            return 1
    try:
        results = verify_pairs(params, [args.size], args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{report(results)}")
    return 0 if results[0]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
