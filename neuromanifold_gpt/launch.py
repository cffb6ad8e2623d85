"""Launching training runs: each in a fresh process of this package's trainer
(`python -m neuromanifold_gpt`, what train.py runs), or in several through torchrun. The DVC
train stage and verify_gradient_checkpointing.py both plan their runs with `plan_run`, so both make the same
runs, and both get train.py's exit codes even through torchrun: settings are checked here
before any process starts, torchrun runs under `torchrun` below (the first failed rank's exit
code, and its `error:` line the last one printed), and an out-of-memory or a diverged loss is
read from the metrics the run wrote.

    python3 -m neuromanifold_gpt.launch --standalone --nproc_per_node=2 -m neuromanifold_gpt ...
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config.cli import parse_args
from .errors import EXIT_NON_FINITE, EXIT_OOM
from .files import read_json
from .params import processes, run_device_type, run_files, training_args
from .trainer import check_run

PACKAGE = Path(__file__).resolve().parent


@dataclass
class PlannedRun:
    command: list[str]  # the trainer, or torchrun over it
    log: Path  # the run's output, kept
    metrics: Path  # the metrics file train.py writes (oom / nonfinite_loss records too)


def training_command(args: list[str], nproc: int = 1) -> list[str]:
    """The one place that says how a run is launched: this package's trainer
    (`python -m neuromanifold_gpt`, by the interpreter running this one) in a fresh process, or
    in nproc processes through torchrun (data-parallel, see neuromanifold_gpt/distributed.py)."""
    if nproc > 1:
        return [sys.executable, "-m", __name__, "--standalone", f"--nproc_per_node={nproc}",
                "-m", PACKAGE.name, *args]
    return [sys.executable, "-m", PACKAGE.name, *args]


def child_env() -> dict[str, str]:
    """The environment of a launched run: this one, with this package's folder first on the
    module path, so the child runs the same copy whatever its working directory."""
    path = [str(PACKAGE.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def plan_run(params: dict, size: str, run: str, root: str | Path = ".",
             overrides: list[str] = ()) -> PlannedRun:
    """The command of one run of a size (params.yaml's settings, then `--key value`
    overrides), checked as train.py would check it: bad params or settings, a missing
    dataset or an unwritable output raise BadInput before anything runs or is written."""
    files = run_files(size, run, root)
    device_type = run_device_type(params)
    args = training_args(params, size, run, device_type, files) + list(overrides)
    nproc = processes(params, device_type)
    check_run(parse_args(args), nproc, {"log": files["log"]})
    return PlannedRun(training_command(args, nproc), files["log"], files["metrics"])


def run_training(run: PlannedRun) -> int:
    """Run a planned training, echo its output and keep it in its log; returns train.py's exit
    code (see neuromanifold_gpt/errors.py), under torchrun too."""
    started = time.time_ns()
    run.log.parent.mkdir(parents=True, exist_ok=True)
    with open(run.log, "w") as log, subprocess.Popen(
            run.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1, env=child_env()) as proc:
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
        except BaseException:  # Ctrl-C or SIGTERM here: the run stops too, cleaning up
            proc.terminate()
            raise
    return _status(proc.returncode, run.metrics, started)


def _status(returncode: int, metrics: Path, started_ns: int) -> int:
    """An exit status made train.py's: a run that failed and recorded an out-of-memory or a
    non-finite loss in this launch's metrics gets that exit code."""
    if returncode == 0:
        return 0
    try:
        if metrics.stat().st_mtime_ns < started_ns:
            return returncode  # an older run's file
        record = read_json(metrics)
    except (OSError, ValueError):
        return returncode
    if record.get("oom") is True:
        return EXIT_OOM
    if record.get("nonfinite_loss") is True:
        return EXIT_NON_FINITE
    return returncode


def torchrun(argv: list[str]) -> int:
    """torchrun with argv, ending as one train.py process ends: with the exit code of the first
    rank that failed, its `error:` line the last thing printed. torchrun itself exits 1 for
    any failed rank, after a log line and a ChildFailedError traceback of its own."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    # the failed rank's log line and the closing signals sent to the others
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        main(argv)
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if 0 < code < 256 else 128 - code if code < 0 else 1  # -N: killed by signal N
    return 0


if __name__ == "__main__":
    sys.exit(torchrun(sys.argv[1:]))
