"""DVC stage: the plots of every size's pair of runs.

    python3 stages/report.py

Reads metrics/train/SIZE/RUN.json, plots/train/SIZE/RUN.tsv (peak per step) and
plots/step/SIZE/RUN.tsv (memory within one step) for params.yaml's sizes; writes
plots/memory_vs_step_time.tsv (for `dvc plots show`) and the PNGs, readable offline (the HTML
of `dvc plots show` loads its JavaScript from a CDN): plots/memory_per_step.png,
plots/memory_in_step.png and plots/memory_vs_step_time.png. Runs that ran out of memory have
no step time and appear in none."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed copy

from neuromanifold_gpt import plots
from neuromanifold_gpt.errors import BadInput, entry_point
from neuromanifold_gpt.files import write_tsv
from neuromanifold_gpt.params import RUNS, load_params, run_files
from neuromanifold_gpt.verify import read_run

COLUMNS = ["size", "run", "policy", "step_time_ms", "peak_memory_gb"]


@entry_point
def main() -> int:
    sizes = list(load_params("sizes")["sizes"])
    runs = {(size, run): read_run(run_files(size, run)["metrics"]) for size in sizes for run in RUNS}
    try:
        traces, timelines = ({size: {run: plots.read_trace(run_files(size, run)[kind]) for run in RUNS}
                              for size in sizes} for kind in ("trace", "timeline"))
    except (OSError, KeyError) as e:
        raise BadInput(f"a memory trace is missing or damaged ({e}); re-run the training stages "
                         f"(dvc repro --force)") from None
    points = [dict(size=size, run=run, **{k: getattr(m, k) for k in COLUMNS[2:]})
              for (size, run), m in runs.items() if not m.oom]
    write_tsv("plots/memory_vs_step_time.tsv", COLUMNS, [tuple(p.values()) for p in points])
    cuda = any(m.device == "cuda" for m in runs.values())
    plots.plot_memory_per_step(traces, "plots/memory_per_step.png",
                               held="reserved" if cuda else "resident (RSS)")
    recorded = {size: runs for size, runs in timelines.items()  # an OOM run recorded no step
                if all(tl["time_ms"] for tl in runs.values())}
    plots.plot_step_timeline(recorded, "plots/memory_in_step.png")
    plots.plot_memory_vs_step_time(points, "plots/memory_vs_step_time.png")
    print(f"plots: {len(points)} runs of {len(sizes)} sizes -> plots/memory_per_step.png, "
          f"plots/memory_in_step.png, plots/memory_vs_step_time.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
