"""The planner's step costs (neuromanifold_gpt/plan_costs.json) from bench reports: each plan's
step time over the fastest plan's, from one preset's compiled rows of our Trainer, run as
train.py runs them (no variant).

    python3 -m benchmarks.plan_costs --report out/bench/bench.json --write_costs gpt2
    python3 -m benchmarks.plan_costs --report a/bench.json,b/bench.json --write_costs gpt2   # merged
"""

from __future__ import annotations

import argparse
import sys

from neuromanifold_gpt.errors import BadInput, entry_point
from neuromanifold_gpt.planner import COSTS_FILE, write_costs

from .reports import ours_as_run, read_reports


def plan_steps(meta: dict, rows: list[dict], preset: str) -> tuple[dict[str, float], str]:
    """Each plan's step time (ms) from the preset's compiled rows, and the hardware line that
    says where and how they were measured."""
    steps = {r["label"].removeprefix("compiled "): r for r in ours_as_run(rows, preset)
             if r["label"].startswith("compiled ")}
    if not steps:
        raise BadInput(f"no compiled rows of preset {preset!r} in the report; run "
                       f"python3 -m benchmarks.bench --presets {preset} first")
    r = next(iter(steps.values()))
    sources = len(meta.get("sources", [])) or 1
    merged = f", {sources} reports merged (one process each)" if sources > 1 else ""
    # a run cut short leaves some rows with fewer runs than --repeat asked for
    runs = sorted({len(row.get("step_ms_runs", [row["step_ms"]])) for row in steps.values()})
    span = f"{runs[0]}-{runs[-1]}" if len(runs) > 1 else f"{runs[0]}"
    counted = "one run a row" if runs == [1] else f"the median of {span} interleaved runs a row"
    hardware = (f"{meta['device']}, torch {meta['torch_version']}, bf16 autocast, compiled, "
                f"{preset} at {r['batch_size']} x {r['block_size']}, python3 -m benchmarks.bench --steps "
                f"{meta['steps']}, {counted}{merged}")
    return {label: r["step_ms"] for label, r in steps.items()}, hardware


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", default="", metavar="JSON[,JSON...]",
                        help="the bench.json files (a row several hold: the median step time over "
                             "all their runs)")
    parser.add_argument("--write_costs", default="gpt2", metavar="PRESET",
                        help="the preset whose compiled rows give the costs")
    parser.add_argument("--costs_file", default=str(COSTS_FILE), help="where to write them")
    args = parser.parse_args(argv)
    if not args.report:
        raise BadInput("--report names the bench.json files to read, e.g. --report out/bench/bench.json")
    meta, rows = read_reports(args.report)
    write_costs(*plan_steps(meta, rows, args.write_costs), path=args.costs_file)
    print(f"wrote {args.costs_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
