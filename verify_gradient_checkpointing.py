"""Verify that activation checkpointing saves memory without changing training: run a
baseline and a checkpointed training of one model size, compare them, print RESULTS.

    python3 verify_gradient_checkpointing.py                   # shakespeare_char
    python3 verify_gradient_checkpointing.py --size gpt2 --max_iters 5 --checkpoint_policy mlp

Both runs take params.yaml's settings for the size, exactly as the DVC pipeline's runs do,
each in a fresh train.py process; any further --key value (a TrainConfig field) goes to both.
Metrics, memory traces and logs go under --out, which one run holds at a time (a second
run at once is refused). Exit status: 0 passed, 1 failed (a run crashed, memory was not
saved, or the losses differ), 2 bad input, 4 a run's loss became non-finite, 130 interrupted."""

import argparse
import contextlib
import fcntl
import sys
from pathlib import Path

from neuromanifold_gpt.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NON_FINITE,
    EXIT_OOM,
    BadInput,
    entry_point,
)
from neuromanifold_gpt.files import check_output
from neuromanifold_gpt.launch import plan_run, run_training
from neuromanifold_gpt.params import PER_RUN_FLAGS, RUNS, check_criteria, load_params, run_device_type
from neuromanifold_gpt.verify import report, verify_pairs


@contextlib.contextmanager
def holding(out: Path):
    """The --out folder for this run alone: a second run at once would read this one's files.
    The lock goes with the process, however it ends."""
    lock_path = out / ".lock"
    check_output(lock_path, "--out")
    out.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInput(f"another verify_gradient_checkpointing.py run is using {out}; wait "
                             f"for it to finish or pass --out OTHER_FOLDER") from None
        yield


@entry_point
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="shakespeare_char", help="a key of params.yaml's sizes")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="out/verify", help="folder for the runs' files")
    args, overrides = parser.parse_known_args(argv)
    reserved = [a for a in overrides if a.lstrip("-").partition("=")[0] in PER_RUN_FLAGS]  # set per run
    if reserved:
        raise BadInput(f"{reserved[0]} is set by this script for each run; drop it")
    params = load_params("train", "sizes", "checkpointing", "verify", path=args.params)
    check_criteria(params, run_device_type(params), args.size)  # before minutes of training
    # both runs are planned before either starts: bad settings stop it with nothing written
    plans = {run: plan_run(params, args.size, run, args.out, overrides) for run in RUNS}
    with holding(Path(args.out)):
        for run, planned in plans.items():
            status = run_training(planned)
            if status in (EXIT_BAD_INPUT, EXIT_NON_FINITE, EXIT_INTERRUPTED):
                return status  # train.py has said what happened
            if status not in (0, EXIT_OOM):
                print(f"VERIFICATION FAILED ✗: the {run} run exited with status {status} "
                      f"(its log: {planned.log})")
                return EXIT_FAILED
        results = verify_pairs(params, [args.size], args.out)
    print(f"\n{report(results)}")
    return 0 if results[0].passed else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
