"""DVC stage: judge each model size's pair of runs and print the RESULTS.

    python3 stages/verify.py

Reads every size's metrics/train/SIZE/{baseline,checkpointed}.json and params.yaml's `verify`
section; writes metrics/verify.json (per size: both peaks, the reduction, the step-time ratio,
the loss difference and whether it passed) and metrics/verify_details.json (the verdicts, the
runs' setting and provenance, the criteria used), and prints a RESULTS block per size, a table
over all sizes and the overall verdict. Exit status: 0 every size passed, 1 one failed (so the stage
fails), 2 metrics missing or corrupt."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed copy

from neuromanifold_gpt.errors import EXIT_FAILED, entry_point
from neuromanifold_gpt.files import check_outputs, write_json
from neuromanifold_gpt.params import load_params
from neuromanifold_gpt.verify import report, verify_details, verify_metrics, verify_pairs

VERIFY_FILE = "metrics/verify.json"  # a DVC metric: the headline figures only
DETAILS_FILE = "metrics/verify_details.json"  # what they are about: not a metric, kept out of diffs


@entry_point
def main() -> int:
    params = load_params("sizes", "verify")
    results = verify_pairs(params, list(params["sizes"]))
    print(report(results))
    check_outputs({"verify metrics": VERIFY_FILE, "verify details": DETAILS_FILE})
    write_json(DETAILS_FILE, verify_details(results))
    summary = verify_metrics(results)
    write_json(VERIFY_FILE, summary)
    return 0 if summary["passed"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
