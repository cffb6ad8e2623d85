"""DVC stage: check params.yaml whole, and describe the machine the runs will measure on.

    python3 stages/hardware.py

Runs on every `dvc repro` (always_changed). Validates every section of params.yaml first (the
verify thresholds and tolerances for every device, policy and size included), so a bad value
stops the pipeline here, before DVC removes any stage's outputs. Then writes
metrics/hardware.json (device type, name and count, torch and CUDA versions, the dtype the runs
use), which every training stage depends on: on the same machine it is unchanged and nothing
re-measures; on other hardware or another torch every size is measured again. Prints, in
plain words, whether this machine measured the figures in metrics/."""

import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed copy

from neuromanifold_gpt.config.base import System
from neuromanifold_gpt.errors import BadInput, entry_point
from neuromanifold_gpt.files import write_json
from neuromanifold_gpt.params import RUNS, SECTIONS, load_params, pick, run_device_type, run_files, validate
from neuromanifold_gpt.provenance import HARDWARE_FILE, hardware, hardware_news
from neuromanifold_gpt.record import RunRecord


@entry_point
def main() -> int:
    params = load_params(*SECTIONS)
    validate(params)
    device_type = run_device_type(params)
    train = params["train"]
    hw = hardware(System(device=pick(train.get("device", "auto"), device_type),
                         dtype=pick(train.get("dtype", "auto"), device_type)))
    figures = [read for size in params["sizes"] for run in RUNS
               if (read := _figures(run_files(size, run)["metrics"]))]
    print(hardware_news(hw, figures))
    write_json(HARDWARE_FILE, hw)
    return 0


def _figures(path: Path) -> dict | None:
    """A run's metrics, if readable and saying where it ran (a missing or damaged one is
    measured anyway)."""
    try:
        record = RunRecord.read(path)
    except BadInput:
        return None
    return asdict(record) if record.device_name and record.torch_version else None


if __name__ == "__main__":
    sys.exit(main())
