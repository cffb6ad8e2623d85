"""Verification that activation checkpointing saves memory without changing training.

Each model size has a baseline and a checkpointed run with one seed and one data order
(neuromanifold_gpt/launch.py makes them). `compare` judges the pair: a pass needs a
peak-memory reduction above the threshold in params.yaml (or a baseline that ran out of
memory where the checkpointed run fit), no failed run, and losses that agree. The verify
stage and verify_gradient_checkpointing.py print its verdict as the RESULTS block."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from tabulate import tabulate

from .errors import BadInput
from .files import read_json
from .params import RUNS, run_files, verify_criteria

# Settings both runs of a pair must share, or their peaks are not comparable.
# The memory levers are among them: a saving must be checkpointing's own.
SAME_SETTINGS = ("preset", "params", "batch_size", "block_size", "gradient_accumulation_steps",
                 "iters", "device", "dtype", "world_size", "compile", "lean_loss",
                 "offload_activations", "optimizer_in_backward", "activation_memory_budget")
# Where a run's figures come from: runs that differ here were measured by other training code,
# hardware or torch, and are not a pair (a params-only change keeps all three).
PROVENANCE = {"code_hash": "training code", "device_name": "hardware", "torch_version": "torch"}
RUN_KEYS = SAME_SETTINGS + ("gradient_checkpointing", "policy", *PROVENANCE, "peak_memory_gb",
                            "peak_memory_source", "step_time_ms", "final_train_loss", "final_val_loss",
                            "last_step_loss")
# What a result says about the runs (from the checkpointed run, or the baseline if it ran out).
DESCRIBED = ("params", "policy", "batch_size", "block_size", "device", "device_name", "dtype",
             "torch_version", "peak_memory_source")
RULE = "=" * 80


# -- judging a pair ---------------------------------------------------------------------------
@dataclass
class Criteria:
    threshold_pct: float  # a pass needs a peak-memory reduction above this
    expected_range_pct: tuple[float, float]  # the reduction the design expects (wording only)
    loss_tolerance: float  # largest allowed |loss difference| between the two runs

    @classmethod
    def from_params(cls, params: dict, device_type: str, size: str) -> Criteria:
        return cls(**verify_criteria(params, device_type, size))


def _bool(v) -> bool:
    return isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# What each field read from a run's metrics must be (a wrong type or range is a corrupt file,
# never a verdict): the test, and what it expects, in words.
FIELD_CHECKS = {
    "oom": (_bool, "true or false"),
    "nonfinite_loss": (_bool, "true or false"),
    "gradient_checkpointing": (_bool, "true or false"),
    "compile": (_bool, "true or false"),
    "lean_loss": (_bool, "true or false"),
    "offload_activations": (_bool, "true or false"),
    "optimizer_in_backward": (_bool, "true or false"),
    "peak_memory_gb": (lambda v: _number(v) and v > 0, "a number > 0"),
    "step_time_ms": (lambda v: _number(v) and v > 0, "a number > 0"),
    "final_train_loss": (_number, "a finite number"),
    "final_val_loss": (_number, "a finite number"),
    "last_step_loss": (_number, "a finite number"),
    "activation_memory_budget": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "device": (lambda v: v in ("cpu", "cuda"), "cpu or cuda"),
    **{k: (_count, "a whole number > 0") for k in ("params", "batch_size", "block_size",
                                                   "gradient_accumulation_steps", "iters",
                                                   "world_size")},
    **{k: (lambda v: isinstance(v, str), "a string") for k in (
        "preset", "policy", "dtype", "device_name", "torch_version", "peak_memory_source")},
}


def read_run(path: str | Path) -> dict:
    """One run's metrics, checked to hold what the comparison needs, each field of the right
    type and range."""
    data = read_json(path, required=("oom", "preset"))
    data.setdefault("nonfinite_loss", False)  # metrics written before it was recorded
    if data["nonfinite_loss"] is True or data["oom"] is True:  # a failed run has no figures
        keys = ("oom", "nonfinite_loss", "preset")
    else:
        keys = RUN_KEYS + ("oom", "nonfinite_loss")
        data = read_json(path, required=RUN_KEYS) | data
        if data["step_time_ms"] is None:
            raise BadInput(f"metrics file {path} has no step time; re-run the training with "
                             f"max_iters >= 2 (the first step is warm-up)")
    for key in keys:
        check, expected = FIELD_CHECKS.get(key, (lambda v: True, ""))
        if not check(data[key]):
            raise BadInput(f"metrics file {path}: {key} is {data[key]!r}, not {expected}; it is "
                             f"corrupt: re-run the training that writes it")
    if data["nonfinite_loss"] and not isinstance(data.get("nonfinite_step"), int):
        raise BadInput(f"metrics file {path}: nonfinite_step is {data.get('nonfinite_step')!r}, "
                         f"not a step number; re-run the training that writes it")
    return data


def compare(size: str, baseline: dict, optimized: dict, criteria: Criteria) -> dict:
    """The verdict on one size's pair, as a flat dict (an entry of metrics/verify.json)."""
    ran_through = not (baseline.get("nonfinite_loss") or optimized.get("nonfinite_loss"))
    if ran_through and not optimized["oom"] and not optimized["gradient_checkpointing"]:
        raise BadInput(f"the checkpointed run of {size} had gradient_checkpointing off; set "
                         f"checkpointing.gradient_checkpointing: true in params.yaml")
    if ran_through and not baseline["oom"] and baseline["gradient_checkpointing"]:
        raise BadInput(f"the baseline run of {size} had gradient_checkpointing on; it must be off")
    for key, what in PROVENANCE.items():
        if baseline.get(key) != optimized.get(key):
            raise BadInput(f"the two runs of {size} were measured with different {what} ({key} "
                             f"{baseline.get(key)} vs {optimized.get(key)}); re-measure both: "
                             f"dvc repro --force")
    figures = dict.fromkeys(("reduction_gb", "reduction_pct", "step_time_ratio", "loss_diff"))
    diverged = [(name, r) for name, r in (("baseline", baseline), ("checkpointed", optimized))
                if r.get("nonfinite_loss")]
    if diverged:
        name, r = diverged[0]
        verdict = f"✗ FAILURE: the {name} run's loss became non-finite at step {r['nonfinite_step']}"
    elif optimized["oom"]:
        verdict = "✗ FAILURE: the checkpointed run ran out of memory"
    elif baseline["oom"]:
        verdict = "✓ SUCCESS: the baseline ran out of memory; with checkpointing the run fits"
    else:
        for key in SAME_SETTINGS:
            if baseline[key] != optimized[key]:
                raise BadInput(f"the two runs of {size} differ in {key} ({baseline[key]} vs "
                                 f"{optimized[key]}); re-run both with the same settings")
        b, o = baseline["peak_memory_gb"], optimized["peak_memory_gb"]
        figures = {"reduction_gb": b - o, "reduction_pct": 100 * (b - o) / b,
                   "step_time_ratio": optimized["step_time_ms"] / baseline["step_time_ms"],
                   "loss_diff": max(abs(baseline[k] - optimized[k]) for k in
                                    ("final_train_loss", "final_val_loss", "last_step_loss"))}
        verdict = _verdict(figures, criteria)
    ran = baseline if optimized["oom"] or optimized.get("nonfinite_loss") else optimized
    return {"size": size, "passed": verdict.startswith("✓"), "verdict": verdict,
            "baseline_oom": bool(baseline["oom"]), "optimized_oom": bool(optimized["oom"]),
            "baseline_peak_gb": baseline.get("peak_memory_gb"),
            "optimized_peak_gb": optimized.get("peak_memory_gb"),
            **figures, **{k: ran.get(k) for k in DESCRIBED}, **asdict(criteria)}


def _verdict(figures: dict, criteria: Criteria) -> str:
    pct, (low, high) = figures["reduction_pct"], criteria.expected_range_pct
    expected = f"expected range ({low:g}-{high:g}%)"
    if figures["loss_diff"] > criteria.loss_tolerance:
        return (f"✗ FAILURE: losses differ by {figures['loss_diff']:.3g} (tolerance "
                f"{criteria.loss_tolerance:g}): checkpointing changed training")
    if pct <= criteria.threshold_pct:
        return (f"✗ FAILURE: Memory reduction ({pct:.1f}%) is not above the threshold "
                f"({criteria.threshold_pct:g}%)")
    if low <= pct <= high:
        return f"✓ SUCCESS: Memory reduction ({pct:.1f}%) is within {expected}"
    if pct > high:
        return f"✓ SUCCESS: Memory reduction ({pct:.1f}%) is above the {expected}"
    return (f"✓ SUCCESS: Memory reduction ({pct:.1f}%) is above the threshold "
            f"({criteria.threshold_pct:g}%) but below the {expected}")


# -- reporting ---------------------------------------------------------------------------------
def _gb(value, oom: bool) -> str:
    return "out of memory" if oom else "n/a (the run diverged)" if value is None else f"{value:.3f} GB"


def results_block(result: dict) -> str:
    """The RESULTS block for one size."""
    if result["reduction_gb"] is None:
        reduction = "n/a (a run did not finish)"
    else:
        reduction = f"{result['reduction_gb']:.3f} GB ({result['reduction_pct']:.1f}%)"
    return "\n".join([
        "RESULTS", RULE, "",
        f"  {'Baseline peak memory:':<25}{_gb(result['baseline_peak_gb'], result['baseline_oom'])}",
        f"  {'Optimized peak memory:':<25}{_gb(result['optimized_peak_gb'], result['optimized_oom'])}",
        f"  {'Memory reduction:':<25}{reduction}", "",
        f"  {result['verdict']}", "",
        "VERIFICATION PASSED ✓" if result["passed"] else "VERIFICATION FAILED ✗",
    ])


def describe(result: dict) -> str:
    """One line naming what a RESULTS block is about."""
    params = f"{result['params'] / 1e6:.2f}M parameters, " if result["params"] else ""
    return (f"{result['size']}: {params}batch {result['batch_size']} x {result['block_size']}, "
            f"policy {result['policy']}, {result['device_name']}, {result['dtype']}, "
            f"torch {result['torch_version']}; peak from {result['peak_memory_source']}")


def results_table(results: list[dict]) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    rows = [[r["size"], fmt(r["baseline_peak_gb"], ".3f") if not r["baseline_oom"] else "OOM",
             fmt(r["optimized_peak_gb"], ".3f") if not r["optimized_oom"] else "OOM",
             fmt(r["reduction_gb"], ".3f"), fmt(r["reduction_pct"], ".1f"),
             fmt(r["step_time_ratio"], ".2f"), fmt(r["loss_diff"], ".2g"),
             f"{r['threshold_pct']:g}", "pass" if r["passed"] else "FAIL"] for r in results]
    return tabulate(rows, headers=["size", "baseline GB", "optimized GB", "saved GB", "saved %",
                                   "step time x", "loss diff", "threshold %", "result"],
                    disable_numparse=True)


def report(results: list[dict]) -> str:
    """A RESULTS block per size, then (for several sizes) the table and the overall verdict."""
    parts = [f"{describe(r)}\n{results_block(r)}" for r in results]
    if len(results) > 1:
        failed = [r["size"] for r in results if not r["passed"]]
        parts += [results_table(results),
                  f"{len(results) - len(failed)} of {len(results)} sizes passed"
                  + (f" ({', '.join(failed)} failed)" if failed else "") + ": "
                  + ("VERIFICATION FAILED ✗" if failed else "VERIFICATION PASSED ✓")]
    return "\n\n".join(parts)


def verify_metrics(results: list[dict]) -> dict:
    """metrics/verify.json: the overall pass flag and, per size, the comparison's figures."""
    drop = ("size", "verdict")
    return {"passed": all(r["passed"] for r in results),
            "sizes": {r["size"]: {k: v for k, v in r.items() if k not in drop} for r in results}}


def verify_pairs(params: dict, sizes: list[str], root: str | Path = ".") -> list[dict]:
    """Read and judge the pair of each size (metrics files under root)."""
    results = []
    for size in sizes:
        baseline, optimized = (read_run(run_files(size, run, root)["metrics"]) for run in RUNS)
        # only CUDA runs out of memory, and an OOM record names no device
        device_type = next((r["device"] for r in (optimized, baseline) if "device" in r), "cuda")
        results.append(compare(size, baseline, optimized,
                               Criteria.from_params(params, device_type, size)))
    return results
