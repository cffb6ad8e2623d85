"""The planner's promises, checked: each run a fresh training process (the package's launcher,
as train.py and python3 -m neuromanifold_gpt run it) on random tokens.

    python3 -m benchmarks.plans --plans batch,budget --against out/bench/bench.json --out_dir out/plans
    python3 -m benchmarks.plans --plans batch --batch_presets gpt2 --batch_plans "block +lean"

`batch` trains each of --batch_presets a few steps at --batch_size auto under each of
--batch_plans (by default none, block and block +lean: did it run, how far is the measured peak
from the predicted one?); `budget` trains each of --budget_presets with --memory_budget_gb for
each of --budgets (is the measured peak within the budget, and how does the step compare with
the fastest row of the bench.json files given by --against that fits?). Writes OUT_DIR/plans.json
and plans.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from neuromanifold_gpt.errors import BadInput, entry_point
from neuromanifold_gpt.files import atomic_path, write_json
from neuromanifold_gpt.planner import PLANS

from .reports import fmt, ours_as_run, read_reports
from .rows import VOCAB, write_tokens

# the plans a batch check may train, as the launcher's flags (the command line spells a Python
# value as the config file does: True, None, 0.5)
PLAN_FLAGS = {label: [f"--{k}={v}" for k, v in dict(PLANS)[label].items()]
              for label in ("none", "block", "block +lean")}
PLAN_BATCH_STEPS = 3  # timed steps of a batch-size run: enough to reach the step's peak
# After training, in the same process: what the device holds beyond the allocator's reserve
# (CUDA context, loaded kernels, library handles), which the headroom must leave free.
CHILD = """
import json, sys, torch
from neuromanifold_gpt.__main__ import main
from neuromanifold_gpt.predictor import GIB, device_memory_gb
code = main(sys.argv[1:])
if torch.cuda.is_initialized():
    free, total = device_memory_gb(torch.device("cuda"))
    print("CHECK " + json.dumps(dict(used_gb=total - free,
          reserved_now_gb=torch.cuda.memory_reserved() / GIB, total_gb=total)))
sys.exit(code)
"""


def run_train(data_dir: str, preset: str, extra: list[str], steps: int, metrics: Path) -> dict:
    """One training process of a few steps: its exit, report lines, and metrics."""
    args = ["--preset", preset, "--dataset", preset, "--data_dir", data_dir,
            "--max_iters", str(steps + 1), "--eval_iters", "1", "--eval_interval", "100000",
            "--log_interval", "100000", "--warmup_iters", "0", "--metrics_file", str(metrics), *extra]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    check = next((json.loads(line[6:]) for line in proc.stdout.splitlines()
                  if line.startswith("CHECK ")), {})
    report = [line for line in proc.stdout.splitlines() if "free of" in line or "memory plan" in line]
    m = json.loads(metrics.read_text()) if metrics.is_file() else {}
    return dict(preset=preset, args=" ".join(extra), exit=proc.returncode, check=check, report=report,
                error=proc.stderr.strip().splitlines()[-1:] if proc.returncode else [],
                batch_size=m.get("batch_size"), oom=m.get("oom"), predicted_gb=m.get("predicted_peak_gb"),
                peak_gb=m.get("peak_memory_gb"), reserved_gb=m.get("peak_reserved_gb"),
                step_ms=m.get("step_time_ms"), policy=m.get("policy"), lean_loss=m.get("lean_loss"),
                offload=m.get("offload_activations"), in_backward=m.get("optimizer_in_backward"),
                checkpointed_blocks=m.get("checkpointed_blocks"))


def fastest_bench_row(rows: list[dict], preset: str, budget: float) -> dict | None:
    fitting = [r for r in ours_as_run(rows, preset) if r["peak_allocated_gb"] <= budget]
    return min(fitting, key=lambda r: r["step_ms"], default=None)


def budget_table(results: list[dict]) -> list[str]:
    lines = ["| preset | budget GiB | plan | predicted GiB | measured GiB | within | step ms | "
             "fastest fitting bench row | its step ms | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        plan = next((x.split(": ", 1)[1].split(" (")[0] for x in r["report"]
                     if x.startswith("memory plan")), (r["error"] or [""])[0])
        within = "yes" if r["peak_gb"] is not None and r["peak_gb"] <= r["budget_gb"] else "no"
        ratio = r["step_ms"] / r["bench_step_ms"] if r["step_ms"] and r["bench_step_ms"] else None
        lines.append(f"| {r['preset']} | {r['budget_gb']:g} | {plan} | "
                     f"{fmt(r['predicted_gb'], '.2f')} | {fmt(r['peak_gb'], '.2f')} | {within} | "
                     f"{fmt(r['step_ms'], '.1f')} | {r['bench_row'] or ''} | "
                     f"{fmt(r['bench_step_ms'], '.1f')} | {fmt(ratio, '.2f')} |")
    return lines + [""]


def batch_table(results: list[dict]) -> list[str]:
    lines = ["| preset | plan | recommended batch | predicted GiB | measured GiB | error % | "
             "reserved GiB | ran |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        err = (r["predicted_gb"] / r["peak_gb"] - 1) * 100 if r["peak_gb"] else None
        ran = "yes" if r["exit"] == 0 else f"no (exit {r['exit']})"
        lines.append(f"| {r['preset']} | {r['plan']} | {r['batch_size']} | "
                     f"{fmt(r['predicted_gb'], '.2f')} | {fmt(r['peak_gb'], '.2f')} | "
                     f"{fmt(err, '+.1f')} | {fmt(r['reserved_gb'], '.2f')} | {ran} |")
    return lines + [""]


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", default="batch,budget", metavar="batch,budget",
                        help="the tables to make (see above)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of a budget run")
    parser.add_argument("--out_dir", default="out/plans")
    parser.add_argument("--batch_presets", default="shakespeare_char,gpt2,gpt2-medium")
    parser.add_argument("--batch_plans", default=",".join(PLAN_FLAGS), metavar="PLAN[,PLAN...]",
                        help="the plans each preset runs at its recommended batch")
    parser.add_argument("--budget_presets", default="gpt2,gpt2-medium")
    parser.add_argument("--budgets", default="3,6,10,20", help="GiB, comma-separated")
    parser.add_argument("--against", default="", metavar="JSON[,JSON...]",
                        help="the bench.json files to compare the budget plans with")
    args = parser.parse_args(argv)
    tables = args.plans.split(",")
    if not set(tables) <= {"batch", "budget"}:
        raise BadInput(f"--plans {args.plans!r}: name the tables batch and/or budget")
    if args.steps < 1:
        raise BadInput("--steps must be at least 1")
    try:
        budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        raise BadInput(f"--budgets {args.budgets!r}: expected GiB as numbers, comma-separated") from None
    batch_plans = list(dict.fromkeys(p.strip() for p in args.batch_plans.split(",")))
    unknown = [p for p in batch_plans if p not in PLAN_FLAGS]
    if unknown:
        raise BadInput(f"--batch_plans: unknown plan {unknown[0]!r}; "
                       f"choose from {', '.join(PLAN_FLAGS)}")
    # (table, preset, the launcher's arguments, timed steps, metrics file, what the row adds)
    runs = [("budget", preset, ["--memory_budget_gb", str(budget)], args.steps,
             f"budget_{preset}_{budget:g}.json", dict(budget_gb=budget))
            for preset in args.budget_presets.split(",") for budget in budgets if "budget" in tables]
    runs += [("batch", preset, ["--batch_size", "auto", *PLAN_FLAGS[plan]], PLAN_BATCH_STEPS,
              f"batch_{preset}_{plan.replace(' ', '')}.json", dict(plan=plan))
             for preset in args.batch_presets.split(",") for plan in batch_plans if "batch" in tables]
    used = dict.fromkeys(run[1] for run in runs)
    unknown = [p for p in used if p not in VOCAB]
    if unknown:
        raise BadInput(f"unknown preset {unknown[0]!r}; choose from {', '.join(VOCAB)}")
    bench_rows = read_reports(args.against)[1] if args.against else []
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {"batch": [], "budget": []}
    with tempfile.TemporaryDirectory() as data_dir:
        for preset in used:
            write_tokens(data_dir, preset, VOCAB[preset], 2_000_000)
        for table, preset, extra, steps, name, facts in runs:
            r = dict(run_train(data_dir, preset, extra, steps, out / name), **facts)
            if table == "budget":
                best = fastest_bench_row(bench_rows, preset, facts["budget_gb"])
                r.update(bench_row=best and best["label"], bench_step_ms=best and best["step_ms"])
            results[table].append(r)
            print(json.dumps(r), flush=True)
            write_json(out / "plans.json", results)
    lines = ((budget_table(results["budget"]) if "budget" in tables else [])
             + (batch_table(results["batch"]) if "batch" in tables else []))
    text = "\n".join(lines) + "\n"
    with atomic_path(out / "plans.md") as tmp:
        tmp.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
