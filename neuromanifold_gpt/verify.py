"""Verification that activation checkpointing saves memory without changing training.

Each model size has a baseline and a checkpointed run with one seed and one data order
(neuromanifold_gpt/launch.py makes them). `compare` judges the pair: a pass needs a
peak-memory reduction above the threshold in params.yaml (or a baseline that ran out of
memory where the checkpointed run fit), no failed run, and losses that agree; a checkpointed
run that used more memory than its baseline never passes. The verify stage and
verify_gradient_checkpointing.py print its verdict as the RESULTS block; the stage writes the
headline figures to metrics/verify.json and what they are about to a details file."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path

from tabulate import tabulate

from .config.base import POLICIES
from .errors import BadInput
from .params import RUNS, run_files, verify_criteria
from .record import RunRecord

# Settings both runs of a pair must share, or their peaks are not comparable.
# The memory levers are among them: a saving must be checkpointing's own.
SAME_SETTINGS = ("preset", "params", "batch_size", "block_size", "gradient_accumulation_steps",
                 "iters", "device", "dtype", "world_size", "compile", "lean_loss",
                 "offload_activations", "optimizer_in_backward", "activation_memory_budget")
# Where a run's figures come from: runs that differ here were measured by other training code,
# hardware or torch, and are not a pair (a params-only change keeps all three).
PROVENANCE = {"code_hash": "training code", "device_name": "hardware", "torch_version": "torch"}
# What a finished run's record must hold to be compared.
NEEDED = SAME_SETTINGS + ("gradient_checkpointing", "policy", *PROVENANCE, "peak_memory_gb",
                          "peak_memory_source", "final_train_loss", "final_val_loss",
                          "last_step_loss")
LOSSES = ("final_train_loss", "final_val_loss", "last_step_loss")
# metrics/verify.json per size, in this order: the figures a change moves, and the verdict.
HEADLINE = ("baseline_peak_gb", "optimized_peak_gb", "reduction_gb", "reduction_pct",
            "step_time_ratio", "loss_diff", "passed")
# What the details file says about a pair's runs (from the checkpointed run, or the baseline
# when the checkpointed run did not finish).
DESCRIBED = ("policy", "params", "batch_size", "block_size", "device", "device_name", "dtype",
             "torch_version", "cuda_version", "git_commit", "code_hash", "peak_memory_source")
RULE = "=" * 80
CPU_STEP_TIMES = ("step time x: the checkpointed run's step time over the baseline's; on a CPU "
                  "it is noise (other processes share the cores), not a measure of recompute")


# -- judging a pair ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Criteria:
    threshold_pct: float  # a pass needs a peak-memory reduction above this (and above 0)
    expected_range_pct: tuple[float, float]  # the reduction the design expects (wording only)
    loss_tolerance: float  # largest allowed |loss difference| between the two runs

    @classmethod
    def from_params(cls, params: dict, device_type: str, size: str, policy: str) -> Criteria:
        return cls(**verify_criteria(params, device_type, size, policy))


@dataclass(frozen=True)
class Result:
    """The verdict on one size's pair of runs, and the figures it rests on."""

    size: str
    baseline: RunRecord
    optimized: RunRecord
    criteria: Criteria  # the checkpointed run's policy's
    verdict: str  # one line, beginning with ✓ or ✗
    reduction_gb: float | None = None  # None where a run did not finish
    reduction_pct: float | None = None
    step_time_ratio: float | None = None  # checkpointed over baseline step time
    loss_diff: float | None = None  # the largest |difference| of the two runs' losses

    @property
    def passed(self) -> bool:
        return self.verdict.startswith("✓")

    @property
    def baseline_peak_gb(self) -> float | None:
        return self.baseline.peak_memory_gb

    @property
    def optimized_peak_gb(self) -> float | None:
        return self.optimized.peak_memory_gb

    @property
    def described(self) -> RunRecord:
        return self.baseline if not self.optimized.finished else self.optimized

    def headline(self) -> dict:
        return {k: getattr(self, k) for k in HEADLINE}

    def details(self) -> dict:
        return {"verdict": self.verdict, "baseline_oom": self.baseline.oom,
                "optimized_oom": self.optimized.oom,
                **{k: getattr(self.described, k) for k in DESCRIBED}, **asdict(self.criteria)}


def read_run(path: str | Path) -> RunRecord:
    """One run's record, checked to hold what a comparison needs (a failed run: its outcome)."""
    record = RunRecord.read(path)
    missing = [k for k in (NEEDED if record.finished else ("device", "policy"))
               if getattr(record, k) is None]
    if missing:
        raise BadInput(f"metrics file {path} lacks {missing[0]}; re-run the training that writes it")
    if record.finished and record.step_time_ms is None:
            raise BadInput(f"metrics file {path} has no step time; re-run the training with "
                           f"max_iters >= 2 (the first step is warm-up)")
    return record


def check_pair(size: str, baseline: RunRecord, optimized: RunRecord) -> None:
    """Refuse two runs that are not a baseline and a checkpointed run of one setting."""
    ran_through = baseline.nonfinite_loss is optimized.nonfinite_loss is False
    if ran_through and not optimized.oom and not optimized.gradient_checkpointing:
        raise BadInput(f"the checkpointed run of {size} had gradient_checkpointing off; set "
                       f"checkpointing.gradient_checkpointing: true in params.yaml")
    if ran_through and not baseline.oom and baseline.gradient_checkpointing:
        raise BadInput(f"the baseline run of {size} had gradient_checkpointing on; it must be off")
    for key, what in PROVENANCE.items():
        if getattr(baseline, key) != getattr(optimized, key):
            raise BadInput(f"the two runs of {size} were measured with different {what} ({key} "
                           f"{getattr(baseline, key)} vs {getattr(optimized, key)}); re-measure "
                           f"both: dvc repro --force")
    if baseline.finished and optimized.finished:
        for key in SAME_SETTINGS:
            if getattr(baseline, key) != getattr(optimized, key):
                raise BadInput(f"the two runs of {size} differ in {key} ({getattr(baseline, key)} "
                               f"vs {getattr(optimized, key)}); re-run both with the same settings")


def compare(size: str, baseline: RunRecord, optimized: RunRecord,
            criteria: dict[str, Criteria]) -> Result:
    """The verdict on one size's pair; `criteria` by recompute policy."""
    check_pair(size, baseline, optimized)
    if optimized.policy not in criteria:
        raise BadInput(f"the checkpointed run of {size} names policy {optimized.policy!r}, not "
                       f"one of {', '.join(criteria)}; re-run it (dvc repro --force)")
    judged = functools.partial(Result, size, baseline, optimized, criteria[optimized.policy])
    diverged = [(name, r) for name, r in (("baseline", baseline), ("checkpointed", optimized))
                if r.nonfinite_loss]
    if diverged:
        name, r = diverged[0]
        return judged(f"✗ FAILURE: the {name} run's loss became non-finite at step {r.nonfinite_step}")
    if optimized.oom:
        return judged("✗ FAILURE: the checkpointed run ran out of memory")
    if baseline.oom:
        return judged("✓ SUCCESS: the baseline ran out of memory; with checkpointing the run fits")
    b, o = baseline.peak_memory_gb, optimized.peak_memory_gb
    figures = {"reduction_gb": b - o, "reduction_pct": 100 * (1 - o / b),
               "step_time_ratio": optimized.step_time_ms / baseline.step_time_ms,
               "loss_diff": max(abs(getattr(baseline, k) - getattr(optimized, k)) for k in LOSSES)}
    return judged(_verdict(figures, criteria[optimized.policy]), **figures)


def _verdict(figures: dict, criteria: Criteria) -> str:
    pct, (low, high) = figures["reduction_pct"], criteria.expected_range_pct
    expected = f"expected range ({low:g}-{high:g}%)"
    if figures["loss_diff"] > criteria.loss_tolerance:
        return (f"✗ FAILURE: losses differ by {figures['loss_diff']:.3g} (tolerance "
                f"{criteria.loss_tolerance:g}): checkpointing changed training")
    if pct <= 0:  # whatever the threshold: checkpointing that costs memory never passes
        return (f"✗ FAILURE: the checkpointed run used more memory than the baseline (reduction "
                f"{pct:.1f}%)")
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
def _gib(run: RunRecord) -> str:
    if run.oom:
        return "out of memory"
    return "n/a (the run diverged)" if run.peak_memory_gb is None else f"{run.peak_memory_gb:.3f} GiB"


def results_block(result: Result) -> str:
    """The RESULTS block for one size."""
    if result.reduction_gb is None:
        reduction = "n/a (a run did not finish)"
    else:
        reduction = f"{result.reduction_gb:.3f} GiB ({result.reduction_pct:.1f}%)"
    return "\n".join([
        "RESULTS", RULE, "",
        f"  {'Baseline peak memory:':<25}{_gib(result.baseline)}",
        f"  {'Optimized peak memory:':<25}{_gib(result.optimized)}",
        f"  {'Memory reduction:':<25}{reduction}", "",
        f"  {result.verdict}", "",
        "VERIFICATION PASSED ✓" if result.passed else "VERIFICATION FAILED ✗",
    ])


def describe(result: Result) -> str:
    """One line naming what a RESULTS block is about."""
    r = result.described
    params = f"{r.params / 1e6:.2f}M parameters, " if r.params else ""
    return (f"{result.size}: {params}batch {r.batch_size} x {r.block_size}, policy {r.policy}, "
            f"{r.device_name}, {r.dtype}, torch {r.torch_version}; peak from {r.peak_memory_source}")


def results_table(results: list[Result]) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    rows = [[r.size, "OOM" if r.baseline.oom else fmt(r.baseline_peak_gb, ".3f"),
             "OOM" if r.optimized.oom else fmt(r.optimized_peak_gb, ".3f"),
             fmt(r.reduction_gb, ".3f"), fmt(r.reduction_pct, ".1f"), fmt(r.step_time_ratio, ".2f"),
             fmt(r.loss_diff, ".2g"), f"{r.criteria.threshold_pct:g}", "pass" if r.passed else "FAIL"]
            for r in results]
    table = tabulate(rows, headers=["size", "baseline GiB", "optimized GiB", "saved GiB", "saved %",
                                    "step time x", "loss diff", "threshold %", "result"],
                     disable_numparse=True)
    on_cpu = any(r.described.device == "cpu" for r in results)
    return f"{table}\n{CPU_STEP_TIMES}" if on_cpu else table


def report(results: list[Result]) -> str:
    """A RESULTS block per size, the table, and the overall verdict."""
    failed = [r.size for r in results if not r.passed]
    verdict = (f"{len(results) - len(failed)} of {len(results)} sizes passed"
               + (f" ({', '.join(failed)} failed)" if failed else "") + ": "
               + ("VERIFICATION FAILED ✗" if failed else "VERIFICATION PASSED ✓"))
    return "\n\n".join([f"{describe(r)}\n{results_block(r)}" for r in results]
                       + [results_table(results), verdict])


def verify_metrics(results: list[Result]) -> dict:
    """metrics/verify.json: the overall pass flag and each size's headline figures."""
    return {"passed": all(r.passed for r in results),
            "sizes": {r.size: r.headline() for r in results}}


def verify_details(results: list[Result]) -> dict:
    """What the figures of metrics/verify.json are about: per size, the verdict, the runs'
    setting and provenance, and the criteria they were judged by."""
    return {"sizes": {r.size: r.details() for r in results}}


def verify_pairs(params: dict, sizes: list[str], root: str | Path = ".") -> list[Result]:
    """Read and judge the pair of each size (metrics files under root)."""
    results = []
    for size in sizes:
        baseline, optimized = (read_run(run_files(size, run, root)["metrics"]) for run in RUNS)
        device = optimized.device
        criteria = {p: Criteria.from_params(params, device, size, p) for p in POLICIES}
        results.append(compare(size, baseline, optimized, criteria))
    return results
