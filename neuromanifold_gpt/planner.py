"""What a run leaves to the machine, decided from the memory predictor before anything is
allocated: the allocator's settings, compile and the lean loss when unset, the recommended
batch (`batch_size auto` trains at it) and the lever that would raise it most, and with
`memory_budget_gb` the fastest plan predicted to fit.

A plan is a recompute policy (or none), the lean loss and the memory levers. Its speed comes
from plan_costs.json: each plan's step time over the fastest plan's, measured by bench.py on
the hardware that file names; its memory from the predictor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch

from .config.base import TrainConfig
from .errors import BadInput
from .predictor import MemoryPrediction, predict

# The share of the memory free at start that the predicted peak may use, per device type.
# CUDA: with expandable segments the allocator reserved at most 1.01x what it allocated at
# 12 x 1024 and at the recommended batches, and CUDA kernels loaded after the start took about
# 1 GiB more (bench and train.py on the H200). CPU: the predictor counts tensors, while the
# process's resident peak also holds the interpreter, libraries and the allocator's slack:
# shakespeare_char on 2 cores peaked at 2.74 GiB for 1.36 predicted (64 x 128) and 7.62 for
# 5.07 (256 x 128), so half the free memory.
HEADROOM = {"cuda": 0.95, "cpu": 0.5}
# A memory budget bounds the measured peak; the prediction stayed within 5% of it on every
# bench row, so a plan fits when its prediction is within this share of the budget.
BUDGET_MARGIN = 0.95
# Compile pays on CUDA from about this size: at 10.7M parameters (shakespeare_char, 64 x 256)
# eager steps were faster than compiled ones, at 124M compiled ones are (bench on the H200).
COMPILE_MIN_PARAMS = 50_000_000
# The lean loss is on by default from this vocabulary (GPT-2's is 50257, a character model's 65)
LEAN_MIN_VOCAB = 8192
COSTS_FILE = Path(__file__).with_name("plan_costs.json")

LEAN = dict(lean_loss=True)
NO_LEAN = dict(lean_loss=False)
BLOCK = dict(gradient_checkpointing=True, checkpoint_policy="block")


def _policy(name: str, **kw) -> dict:
    return dict(gradient_checkpointing=True, checkpoint_policy=name, **kw)


# (label, TrainConfig fields): every plan the budget search weighs, and bench.py's compiled rows
PLANS: list[tuple[str, dict]] = [
    ("none", NO_LEAN),
    ("none +lean", LEAN),
    *[(p, {**_policy(p), **NO_LEAN}) for p in ("attention", "mlp", "selective", "block")],
    *[(f"{p} +lean", {**_policy(p), **LEAN}) for p in ("attention", "mlp", "selective", "block")],
    ("block/2", dict(BLOCK, checkpoint_every=2, **NO_LEAN)),
    ("block/2 +lean", dict(BLOCK, checkpoint_every=2, **LEAN)),
    ("none +lean budget 0.5", dict(LEAN, activation_memory_budget=0.5)),
    ("block +lean +offload", dict(BLOCK, **LEAN, offload_activations=True)),
    ("block +lean +opt-in-bwd", dict(BLOCK, **LEAN, optimizer_in_backward=True)),
    ("block +lean +opt-in-bwd +offload", dict(BLOCK, **LEAN, optimizer_in_backward=True,
                                              offload_activations=True)),
]
# the plans that recompute nothing, by lean loss
NO_RECOMPUTE = {False: "none", True: "none +lean"}
# what a plan decides; every other field stays as the run set it
PLAN_FIELDS = ("gradient_checkpointing", "checkpoint_policy", "checkpoint_every",
               "checkpoint_layers", "lean_loss", "offload_activations", "optimizer_in_backward",
               "activation_memory_budget")
PLAN_DEFAULTS = {k: v for k, v in TrainConfig().to_dict().items() if k in PLAN_FIELDS}
# the single changes a report may suggest, in the words of the command line
LEVERS = [("--lean_loss true", LEAN), ("--gradient_checkpointing true", BLOCK)]


def use_expandable_segments() -> None:
    """Let the CUDA allocator grow segments in place unless the user configured it: without
    this, large tensors (the plain loss's logits run to tens of GiB at big batches) fragment
    the reserve, and a batch predicted to fit ran out of memory. Acts before CUDA starts;
    once it has (tests, bench), it changes the settings for segments made from then on."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    if torch.cuda.is_initialized():
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    else:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def _with(cfg: TrainConfig, **flags) -> TrainConfig:
    """cfg with some flat flags changed (a section's fields too)."""
    return TrainConfig.from_flags(**{**cfg.to_dict(), **flags})


def n_params(cfg: TrainConfig, vocab_size: int) -> int:
    mc = cfg.model_config(vocab_size)
    C = mc.n_embd
    return mc.n_layer * 12 * C * C + mc.padded_vocab_size * C


def resolve_auto(cfg: TrainConfig, vocab_size: int, device_type: str) -> TrainConfig:
    """compile and lean_loss, where the run left them to the machine (None)."""
    cuda = device_type == "cuda"
    compile = cfg.compile if cfg.compile is not None else (
        cuda and n_params(cfg, vocab_size) >= COMPILE_MIN_PARAMS)
    # The lean loss is on where the logits are the largest activation: on CUDA, at a vocabulary
    # of LEAN_MIN_VOCAB or more. It trades step time for memory (plan_costs.json holds each
    # plan's step on the GPU it names, README "Results" the peaks); with block checkpointing it
    # raised the H200's recommended batch from 939 to 1802 sequences of 1024, both of which ran;
    # --lean_loss false trades that memory back for speed.
    lean = cfg.memory_levers.lean_loss
    if lean is None:
        lean = cuda and vocab_size >= LEAN_MIN_VOCAB
    return _with(cfg, compile=compile, lean_loss=lean)


@dataclasses.dataclass
class Setup:
    """A run's settings with everything left to the machine filled in, and why."""

    cfg: TrainConfig  # compile, lean_loss and batch_size concrete; a budget's plan applied
    prediction: MemoryPrediction  # of cfg
    recommended: int  # the largest batch predicted to fit in HEADROOM[device] x free memory
    lever: tuple[str, int] | None  # the one change that raises it most, and to what
    lines: list[str]  # the startup report's memory lines


class Planner:
    """Predictions for one run's device, dtype, vocabulary and world size."""

    def __init__(self, vocab_size: int, device_type: str, dtype: torch.dtype, world_size: int = 1):
        self.vocab_size, self.device_type, self.dtype = vocab_size, device_type, dtype
        self.world_size = world_size

    def predict(self, cfg: TrainConfig, batch_size: int | None = None) -> MemoryPrediction:
        return predict(cfg, self.vocab_size, self.device_type, self.dtype, bool(cfg.compile),
                       batch_size, self.world_size)

    def largest_batch(self, cfg: TrainConfig, limit_gb: float) -> int:
        """The largest batch whose predicted peak is at most limit_gb (0 if none is)."""

        def fits(b: int) -> bool:
            return self.predict(cfg, b).peak_gb <= limit_gb

        if not fits(1):
            return 0
        lo, hi = 1, 2
        while fits(hi) and hi < 1 << 16:
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # fits(lo), not fits(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def best_lever(self, cfg: TrainConfig, limit_gb: float, batch: int) -> tuple[str, int] | None:
        """The single lever (not yet on) that raises the largest fitting batch most."""
        flat = cfg.to_dict()
        options = [(flag, self.largest_batch(_with(cfg, **fields), limit_gb))
                   for flag, fields in LEVERS if any(flat[k] != v for k, v in fields.items())]
        best = max(options, key=lambda o: o[1], default=None)
        return best if best and best[1] > batch else None

    def plans(self, cfg: TrainConfig, costs: dict[str, float]) -> list[tuple[str, TrainConfig, float]]:
        """(label, config, step ratio) of every plan that can run with cfg's other settings."""
        out = []
        for label, fields in PLANS:
            if label not in costs:
                continue
            flags = {**PLAN_DEFAULTS, **fields}
            if flags["activation_memory_budget"] < 1.0 and not cfg.compile:
                continue  # acts only on compiled blocks
            if flags["optimizer_in_backward"] and (cfg.grad_clip > 0 or cfg.gradient_accumulation_steps > 1
                                                   or self.world_size > 1):
                continue  # would change what the run computes (no clipping, no accumulation)
            out.append((label, _with(cfg, **flags), costs[label]))
        return out

    def fastest_plan(self, cfg: TrainConfig, budget_gb: float) -> tuple[str, TrainConfig, list[str]]:
        """The fastest plan whose predicted peak fits budget_gb (ties: the one without recompute,
        then the smaller peak); a ValueError that says what would fit when none does."""
        costs = load_costs()
        scored = [(label, plan, ratio, self.predict(plan).peak_gb)
                  for label, plan, ratio in self.plans(cfg, costs["step_ratio"])]
        fitting = [s for s in scored if s[3] <= BUDGET_MARGIN * budget_gb]
        B = self.predict(cfg).batch_size
        if not fitting:
            label, plan, _, peak = min(scored, key=lambda s: s[3])
            b = self.largest_batch(plan, BUDGET_MARGIN * budget_gb)
            fix = f"lower --batch_size to {b}" if b else "use a smaller model or block_size"
            raise BadInput(f"memory_budget_gb={budget_gb:g} fits no plan at batch_size {B}: the "
                             f"leanest, {label}, needs {peak:.2f} GiB (predicted); raise the budget "
                             f"or {fix}")
        label, plan, ratio, peak = min(
            fitting, key=lambda s: (s[2], s[0] not in NO_RECOMPUTE.values(), s[3]))
        lines = [f"memory plan for {budget_gb:g} GiB: {label} (predicted peak {peak:.2f} GiB, "
                 f"step {ratio:.2f}x the fastest plan's as measured on {costs['hardware']})"]
        return label, plan, lines

    def setup(self, cfg: TrainConfig, free_gb: float, device_gb: float) -> Setup:
        """Fill in what cfg leaves to the machine; the report says what was chosen."""
        lines = []
        resolved = resolve_auto(cfg, self.vocab_size, self.device_type)
        limit = HEADROOM[self.device_type] * free_gb
        if cfg.memory_budget_gb is not None:
            if cfg.memory_budget_gb > limit:
                lines.append(f"memory budget {cfg.memory_budget_gb:g} GiB is more than the device "
                             f"can give ({limit:.1f} GiB); planning for {limit:.1f} GiB")
            _, resolved, plan_lines = self.fastest_plan(resolved, min(cfg.memory_budget_gb, limit))
            lines += plan_lines
        sizing = _with(resolved, batch_size=None) if cfg.batch_size == "auto" else resolved
        recommended = self.largest_batch(sizing, limit)
        lever = self.best_lever(sizing, limit, recommended)
        if cfg.batch_size == "auto":
            if recommended == 0:
                raise BadInput(f"batch_size=auto: not even one sequence is predicted to fit in "
                                 f"{free_gb:.1f} GiB free; {_lever_fix(lever)}")
            resolved = _with(resolved, batch_size=recommended)
        prediction = self.predict(resolved)
        lines = [_levers_line(cfg, resolved), *lines,
                 *prediction.lines()]
        if cfg.batch_size == "auto":
            lines.append(f"batch size: auto, so the recommended {recommended}")
        more = f" (with {lever[0]}: {lever[1]})" if lever else ""
        lines.append(f"recommended batch size: {recommended}{more} for {free_gb:.1f} GiB free of "
                     f"{device_gb:.1f} GiB ({self.device_type})")
        return Setup(resolved, prediction, recommended, lever, lines)


def _lever_fix(lever: tuple[str, int] | None) -> str:
    return f"use {lever[0]}" if lever else "use a smaller model or block_size"


def _levers_line(asked: TrainConfig, cfg: TrainConfig) -> str:
    on, levers = [], cfg.memory_levers
    if levers.lean_loss:
        on.append(f"lean loss{' (auto)' if asked.memory_levers.lean_loss is None else ''}")
    if levers.offload_activations:
        on.append("offload activations")
    if levers.optimizer_in_backward:
        on.append("optimizer in backward")
    if levers.activation_memory_budget < 1.0:
        on.append(f"compile memory budget {levers.activation_memory_budget:g}")
    auto = " (auto)" if asked.compile is None else ""
    return f"compile: {'on' if cfg.compile else 'off'}{auto}; memory levers: {', '.join(on) or 'none'}"


def oom_advice(setup: Setup, batch_size: int) -> tuple[int, str]:
    """After an out-of-memory at batch_size: the largest batch predicted to fit (below
    batch_size: the prediction itself may have missed), and what to run."""
    b = min(setup.recommended, math.floor(HEADROOM["cuda"] * batch_size))  # OOM: CUDA only
    lever = f" (or {setup.lever[0]}: {setup.lever[1]})" if setup.lever else ""
    if b:
        return b, f"--batch_size {b}{lever}"
    return 0, f"batch_size 1 does not fit either; {_lever_fix(setup.lever)}"


def load_costs(path: Path = COSTS_FILE) -> dict:
    """plan_costs.json: {"hardware": str, "step_ratio": {plan label: ratio}}."""
    with open(path) as f:
        return json.load(f)
