"""DVC stage: judge each model size's pair of runs and print the RESULTS.

    python3 stages/verify.py

Reads every size's metrics/train/SIZE/{baseline,checkpointed}.json and params.yaml's `verify`
section; writes metrics/verify.json and prints a RESULTS block per size, a table over all
sizes and the overall verdict. Exit status: 0 every size passed, 1 one failed (so the stage
fails), 2 metrics missing or corrupt."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed copy

from neuromanifold_gpt.errors import EXIT_FAILED, entry_point
from neuromanifold_gpt.files import write_json
from neuromanifold_gpt.params import load_params
from neuromanifold_gpt.verify import report, verify_metrics, verify_pairs

VERIFY_FILE = "metrics/verify.json"


@entry_point
def main() -> int:
    params = load_params("sizes", "verify")
    results = verify_pairs(params, list(params["sizes"]))
    print(report(results))
    summary = verify_metrics(results)
    write_json(VERIFY_FILE, summary)
    return 0 if summary["passed"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
