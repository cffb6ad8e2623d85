"""Check the planner's promises on this machine's GPU, each run a fresh train.py process:

  recommended batch  for each preset and plan, train a few steps at --batch_size auto: did it
                     run, and how far is the measured peak from the predicted one?
  memory budget      for each size and budget, train with --memory_budget_gb: is the measured
                     peak within the budget, and how does the step compare with the fastest
                     bench row that fits (--bench out/bench/bench.json)?

    python3 check_plans.py --bench out/bench/bench.json        # both tables (CUDA)
    python3 check_plans.py --tables budget --budget_presets gpt2

Runs train on random tokens (memory and speed do not depend on the data). Writes
OUT_DIR/plans.json and plans.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from neuromanifold_gpt.data import write_dataset
from neuromanifold_gpt.metrics import atomic_path, read_json, write_json

VOCAB = {"shakespeare_char": 65, "gpt2": 50257, "gpt2-medium": 50257}
POLICIES = {"none": ["--gradient_checkpointing", "false", "--lean_loss", "false"],
            "block": ["--gradient_checkpointing", "true", "--lean_loss", "false"],
            "block +lean": ["--gradient_checkpointing", "true", "--lean_loss", "true"]}
# After training, in the same process: what the device holds beyond the allocator's reserve
# (CUDA context, loaded kernels, library handles), which the headroom must leave free.
CHILD = """
import json, sys, torch, train
code = train.main(sys.argv[1:])
if torch.cuda.is_initialized():
    free, total = torch.cuda.mem_get_info()
    print("CHECK " + json.dumps(dict(exit=code, used_gb=(total - free) / 2**30,
          reserved_now_gb=torch.cuda.memory_reserved() / 2**30, total_gb=total / 2**30)))
sys.exit(code)
"""


def run(data_dir: str, preset: str, extra: list[str], steps: int, metrics: Path) -> dict:
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


def fastest_bench_row(bench: dict, preset: str, budget: float) -> dict | None:
    rows = [r for r in bench.get("rows", []) if r["preset"] == preset and r.get("impl") == "ours"
            and not r.get("kernel") and r.get("peak_allocated_gb") is not None
            and r["peak_allocated_gb"] <= budget]
    return min(rows, key=lambda r: r["step_ms"], default=None)


def fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", default="batch,budget")
    parser.add_argument("--batch_presets", default="shakespeare_char,gpt2,gpt2-medium")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--budget_presets", default="gpt2,gpt2-medium")
    parser.add_argument("--budgets", default="3,6,10,20", help="GiB, comma-separated")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of a batch-size run")
    parser.add_argument("--budget_steps", type=int, default=20, help="timed steps of a budget run")
    parser.add_argument("--bench", default="", help="bench.json to compare the budget plans with")
    parser.add_argument("--out_dir", default="out/plans")
    args = parser.parse_args(argv)
    try:
        bench = read_json(args.bench, required=("rows",)) if args.bench else {}
        budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = args.tables.split(",")
    results: dict[str, list[dict]] = {"batch": [], "budget": []}
    lines = []
    with tempfile.TemporaryDirectory() as data_dir:
        for preset in VOCAB:
            ids = np.random.default_rng(0).integers(0, VOCAB[preset], 2_000_000)
            write_dataset(Path(data_dir) / preset, ids, dict(vocab_size=VOCAB[preset]))
        if "batch" in tables:
            for preset in args.batch_presets.split(","):
                for policy in args.policies.split(","):
                    r = run(data_dir, preset, ["--batch_size", "auto", *POLICIES[policy]], args.steps,
                            out / f"batch_{preset}_{policy.replace(' ', '')}.json")
                    r["plan"] = policy
                    results["batch"].append(r)
                    print(json.dumps(r), flush=True)
                    write_json(out / "plans.json", results)
            lines += ["| preset | plan | recommended batch | predicted GiB | measured GiB | error % | "
                      "reserved GiB | ran |", "|---|---|---|---|---|---|---|---|"]
            for r in results["batch"]:
                err = (r["predicted_gb"] / r["peak_gb"] - 1) * 100 if r["peak_gb"] else None
                ran = "yes" if r["exit"] == 0 else f"no (exit {r['exit']})"
                lines.append(f"| {r['preset']} | {r['plan']} | {r['batch_size']} | "
                             f"{fmt(r['predicted_gb'], '.2f')} | {fmt(r['peak_gb'], '.2f')} | "
                             f"{fmt(err, '+.1f')} | {fmt(r['reserved_gb'], '.2f')} | {ran} |")
            lines.append("")
        if "budget" in tables:
            for preset in args.budget_presets.split(","):
                for budget in budgets:
                    r = run(data_dir, preset, ["--memory_budget_gb", str(budget)], args.budget_steps,
                            out / f"budget_{preset}_{budget:g}.json")
                    best = fastest_bench_row(bench, preset, budget)
                    r.update(budget_gb=budget, bench_row=best and best["label"],
                             bench_step_ms=best and best["step_ms"])
                    results["budget"].append(r)
                    print(json.dumps(r), flush=True)
                    write_json(out / "plans.json", results)
            lines += ["| preset | budget GiB | plan | predicted GiB | measured GiB | within | step ms | "
                      "fastest fitting bench row | its step ms | ratio |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in results["budget"]:
                plan = next((x.split(": ", 1)[1].split(" (")[0] for x in r["report"]
                             if x.startswith("memory plan")), (r["error"] or [""])[0])
                within = "yes" if r["peak_gb"] is not None and r["peak_gb"] <= r["budget_gb"] else "no"
                ratio = (r["step_ms"] / r["bench_step_ms"]
                         if r["step_ms"] and r["bench_step_ms"] else None)
                lines.append(f"| {r['preset']} | {r['budget_gb']:g} | {plan} | "
                             f"{fmt(r['predicted_gb'], '.2f')} | {fmt(r['peak_gb'], '.2f')} | {within} | "
                             f"{fmt(r['step_ms'], '.1f')} | {r['bench_row'] or ''} | "
                             f"{fmt(r['bench_step_ms'], '.1f')} | {fmt(ratio, '.2f')} |")
    text = "\n".join(lines) + "\n"
    with atomic_path(out / "plans.md") as tmp:
        tmp.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
