"""Launching training runs: each in a fresh train.py process (on CPU a run's peak is its
process's peak RSS), or in several through torchrun. The DVC train stage and
verify_gradient_checkpointing.py both plan their runs with `plan_run`, so both make the same
runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .params import processes, run_device_type, run_files, training_args

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"


def training_command(args: list[str], nproc: int = 1) -> list[str]:
    """The one place that says how a run is launched: train.py in a fresh process, or in
    nproc processes through torchrun (data-parallel, see neuromanifold_gpt/distributed.py)."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", str(TRAIN_SCRIPT), *args]
    return [sys.executable, str(TRAIN_SCRIPT), *args]


def plan_run(params: dict, size: str, run: str, root: str | Path = ".",
             overrides: list[str] = ()) -> tuple[list[str], Path]:
    """The command of one run of a size (params.yaml's settings, then `--key value`
    overrides) and the log it keeps; bad params raise ValueError before anything runs."""
    files = run_files(size, run, root)
    device_type = run_device_type(params)
    args = training_args(params, size, run, device_type, files) + list(overrides)
    return training_command(args, processes(params, device_type)), files["log"]


def run_training(command: list[str], log_path: Path) -> int:
    """Run a training command, echo its output and keep it in log_path; returns its exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
    return proc.returncode
