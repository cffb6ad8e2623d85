"""The plan: what a run will do, decided once from its config and its machine before anything
is built. `make_plan` fills in what the config leaves to the machine (compile, its unit and
CUDA graphs, the lean loss, `batch_size auto`, a `memory_budget_gb`'s fastest plan) from the
memory predictor; the Trainer builds from the Plan and never reads the config to decide.

A candidate plan is a recompute policy (or none), the lean loss and the memory levers
(`PLANS`): the Plan with those fields replaced. Its speed comes from plan_costs.json (each
plan's step time over the fastest plan's, measured by the bench on the hardware that file
names), its memory from the predictor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch

from .checkpointing import checkpointed_layers
from .config.base import ActivationCheckpoint, MemoryLevers, NeuroManifoldConfig, TrainConfig, check_rules
from .distributed import DistInfo
from .errors import BadInput
from .files import write_json
from .predictor import MemoryPrediction, check_states_fit, n_params, predict

# The share of the memory free at start that the predicted peak may use, per device type. CUDA:
# the allocator reserves a little more than it allocates and kernels loaded after the start
# take some memory. CPU: the predictor counts tensors, while the process also holds the
# interpreter, libraries and the allocator's slack.
HEADROOM = {"cuda": 0.95, "cpu": 0.5}
# A memory budget bounds the measured peak: a plan fits when its prediction is within this
# share of the budget, the predictor's error on the bench rows (docs/results/).
BUDGET_MARGIN = 0.95
# Compile pays on CUDA from about this size: below it, eager steps were faster in the bench.
COMPILE_MIN_PARAMS = 50_000_000
# The lean loss is on by default from this vocabulary (GPT-2's is 50257, a character model's 65):
# there the logits are the largest activation.
LEAN_MIN_VOCAB = 8192
COSTS_FILE = Path(__file__).with_name("plan_costs.json")

LEAN = dict(lean_loss=True)
NO_LEAN = dict(lean_loss=False)
# every block checkpointed whole, whatever blocks or policy a run checkpoints
BLOCK = dict(gradient_checkpointing=True, checkpoint_policy="block", checkpoint_layers=None,
             checkpoint_every=1)


def _policy(name: str, **kw) -> dict:
    return dict(gradient_checkpointing=True, checkpoint_policy=name, **kw)


# (label, plan flags): every plan the budget search weighs, and the bench's compiled rows
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
# the single changes a report may suggest, named by the flags that differ from a run's
LEVERS = [LEAN, BLOCK]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a run decided before anything is built."""

    device: torch.device
    dtype: torch.dtype  # the compute dtype (bf16 under autocast, or fp32)
    dist: DistInfo  # this process's rank, the world size and the parallelism
    model: NeuroManifoldConfig  # the architecture, and whether it is checkpointed
    checkpoint: ActivationCheckpoint  # which activations are recomputed, when checkpointed
    levers: MemoryLevers  # lean_loss decided (never None)
    batch_size: int  # sequences per micro-step
    block_size: int  # tokens per sequence
    accumulation: int  # micro-steps per optimizer step, all ranks together
    grad_clip: float  # the gradient norm's clip (0 = off)
    compile: bool  # torch.compile the model
    compile_unit: str  # model | block: what one compiled graph holds
    cuda_graphs: bool  # the compiled code replays as CUDA graphs
    asked: tuple[str, bool | None] = ("auto", None)  # the config's compile_unit and cuda_graphs

    @property
    def layers(self) -> list[int]:
        """The blocks that are checkpointed."""
        return checkpointed_layers(self.model, self.checkpoint)

    @property
    def policy(self) -> str:
        """What is recomputed: a policy's name, or none."""
        return self.checkpoint.checkpoint_policy if self.model.gradient_checkpointing else "none"

    @property
    def layer_policies(self) -> list[str]:
        """Each block's policy: the plan's for the checkpointed blocks, none for the rest."""
        layers = set(self.layers)
        return [self.policy if i in layers else "none" for i in range(self.model.n_layer)]

    @property
    def micro_steps(self) -> int:
        """Micro-steps per optimizer step on this rank."""
        return self.accumulation // self.dist.world_size

    def broken_rule(self) -> str | None:
        return check_rules(self.levers, self.compile, self.grad_clip, self.accumulation,
                           self.dist.world_size, self.dist.parallelism == "fsdp", *self.asked)

    def replace(self, **flags) -> Plan:
        """This plan with some plan flags (PLANS' names, and batch_size) changed, each where it
        lives; compile's unit and CUDA graphs follow the new levers where they were automatic."""
        model = dict(gradient_checkpointing=flags.pop("gradient_checkpointing")) \
            if "gradient_checkpointing" in flags else {}
        ac = {f.name: flags.pop(f.name) for f in dataclasses.fields(ActivationCheckpoint) if f.name in flags}
        levers = {f.name: flags.pop(f.name) for f in dataclasses.fields(MemoryLevers) if f.name in flags}
        return dataclasses.replace(self, model=dataclasses.replace(self.model, **model),
                                   checkpoint=dataclasses.replace(self.checkpoint, **ac),
                                   levers=dataclasses.replace(self.levers, **levers), **flags)


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


def resolve(cfg: TrainConfig, vocab_size: int, device: torch.device, dtype: torch.dtype,
            dist: DistInfo | None = None) -> Plan:
    """The plan cfg asks for on this device, with compile, its unit, CUDA graphs and the lean
    loss decided where cfg leaves them to the machine (None or auto); the batch is cfg's or the
    preset's, also for `auto` until make_plan sizes it."""
    dist = dist or DistInfo()
    cuda = device.type == "cuda"
    B, T = cfg.resolved_batch(device.type)
    mc = cfg.model_config(vocab_size, T)
    compile = cfg.compile.enable
    if compile is None:
        compile = cuda and n_params(mc) >= COMPILE_MIN_PARAMS
    lean = cfg.memory_levers.lean_loss
    if lean is None:
        lean = cuda and vocab_size >= LEAN_MIN_VOCAB
    plan = Plan(device=device, dtype=dtype, dist=dist, model=mc, checkpoint=cfg.activation_checkpoint,
                levers=dataclasses.replace(cfg.memory_levers, lean_loss=lean),
                batch_size=B, block_size=T,
                accumulation=cfg.data.gradient_accumulation_steps, grad_clip=cfg.optimizer.grad_clip,
                compile=compile, compile_unit="model", cuda_graphs=False,
                asked=(cfg.compile.compile_unit, cfg.compile.cuda_graphs))
    return settle(plan)


def settle(plan: Plan) -> Plan:
    """plan with compile's unit and CUDA graphs decided from its other fields where the config
    left them to the machine, and checked against every cross-field rule.

    Block by block under FSDP2 (its hooks gather each block's parameters at the block's
    boundary, between the graphs) and with the lean loss (a Python loop, eager either way); the
    whole model otherwise, the plain loss inside it, which steps faster. CUDA graphs in a single
    CUDA process with one micro-step a step: FSDP2's hooks cannot live in a graph, a graph's
    next replay would overwrite the gradients a micro-step leaves for the next, and offloaded
    activations' host copies between the graphs cost more than the graphs save."""
    unit, graphs = plan.asked
    if unit == "auto":
        unit = "block" if plan.dist.parallelism == "fsdp" or plan.levers.lean_loss else "model"
    if graphs is None:
        graphs = (plan.compile and plan.device.type == "cuda" and plan.dist.parallelism == "none"
                  and plan.micro_steps == 1 and not plan.levers.offload_activations)
    elif graphs and plan.device.type != "cuda":
        raise BadInput(f"cuda_graphs=true needs a CUDA device, and this run is on {plan.device.type}; "
                       f"leave cuda_graphs at auto")
    plan = dataclasses.replace(plan, compile_unit=unit, cuda_graphs=graphs)
    broken = plan.broken_rule()
    if broken:
        raise BadInput(broken)
    return plan


@dataclasses.dataclass
class PlanReport:
    """What make_plan measured against the machine, for the startup report and OOM advice."""

    prediction: MemoryPrediction  # of the plan
    recommended: int  # the largest batch predicted to fit in HEADROOM[device] x free memory
    # and in the memory budget's share (BUDGET_MARGIN)
    lever: tuple[str, int] | None  # the one change that raises it most, and to what
    lines: list[str]  # the startup report's memory lines


def largest_batch(plan: Plan, limit_gb: float) -> int:
    """The largest batch whose predicted peak is at most limit_gb (0 if none is)."""

    def fits(b: int) -> bool:
        return predict(plan, b).peak_gb <= limit_gb

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi) and hi < 1 << 16:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _flags_of(plan: Plan) -> dict:
    """The plan's values of the flags PLANS and LEVERS set."""
    return {"gradient_checkpointing": plan.model.gradient_checkpointing,
            **dataclasses.asdict(plan.checkpoint), **dataclasses.asdict(plan.levers)}


def _word(value) -> str:
    """A flag's value as the command line spells it."""
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def best_lever(plan: Plan, limit_gb: float, batch: int) -> tuple[str, int] | None:
    """The single lever (not yet on) that raises the largest fitting batch most, named by the
    flags that turn it on from this plan, and the batch it gives."""
    flat = _flags_of(plan)
    options = [(" ".join(f"--{k} {_word(v)}" for k, v in fields.items() if flat[k] != v),
                largest_batch(settle(plan.replace(**fields)), limit_gb))
               for fields in LEVERS if any(flat[k] != v for k, v in fields.items())]
    best = max(options, key=lambda o: o[1], default=None)
    return best if best and best[1] > batch else None


def candidates(plan: Plan, costs: dict[str, float]) -> list[tuple[str, Plan, float]]:
    """(label, plan, step ratio) of every plan in PLANS that costs names and that can run with
    the plan's other settings (the cross-field rules)."""
    out = []
    defaults = {**_flags_of(plan), "gradient_checkpointing": False,
                **dataclasses.asdict(ActivationCheckpoint()),
                **{k: v for k, v in dataclasses.asdict(MemoryLevers()).items()
                   if k not in ("loss_chunk_tokens", "loss_kernel")}}
    for label, fields in PLANS:
        if label in costs:
            candidate = plan.replace(**{**defaults, **fields})
            if candidate.broken_rule() is None:
                out.append((label, settle(candidate), costs[label]))
    return out


def fastest_plan(plan: Plan, budget_gb: float, room_gb: float) -> tuple[str, Plan, list[str]]:
    """The fastest plan for memory_budget_gb=budget_gb whose predicted peak fits room_gb (ties:
    the one without recompute, then the smaller peak); BadInput saying what would fit when none
    does."""
    costs = load_costs()
    scored = [(label, p, ratio, predict(p).peak_gb)
              for label, p, ratio in candidates(plan, costs["step_ratio"])]
    fitting = [s for s in scored if s[3] <= room_gb]
    if not fitting:
        label, leanest, _, peak = min(scored, key=lambda s: s[3])
        b = largest_batch(leanest, room_gb)
        fix = f"lower --batch_size to {b}" if b else "use a smaller model or block_size"
        raise BadInput(f"memory_budget_gb={budget_gb:g} fits no plan at batch_size {plan.batch_size}: "
                       f"the leanest, {label}, needs {peak:.2f} GiB (predicted); raise the budget "
                       f"or {fix}")
    label, best, ratio, peak = min(
        fitting, key=lambda s: (s[2], s[0] not in NO_RECOMPUTE.values(), s[3]))
    lines = [f"memory plan for {budget_gb:g} GiB: {label} (predicted peak {peak:.2f} GiB, "
             f"step {ratio:.2f}x the fastest plan's as measured on {costs['hardware']})"]
    return label, best, lines


def make_plan(cfg: TrainConfig, vocab_size: int, device: torch.device, dtype: torch.dtype,
              dist: DistInfo, free_gb: float, device_gb: float) -> tuple[Plan, PlanReport]:
    """The run's plan on this machine, and the report of how it was chosen."""
    plan = resolve(cfg, vocab_size, device, dtype, dist)
    check_states_fit(plan, device_gb)
    lines = []
    limit = HEADROOM[device.type] * free_gb
    room = f"{free_gb:.1f} GiB free of {device_gb:.1f} GiB ({device.type})"
    budget = cfg.data.memory_budget_gb
    if budget is not None:
        # the plan is chosen within, and the batch sized for, the budget's share or the
        # device's, whichever is less
        if BUDGET_MARGIN * budget < limit:
            limit, room = BUDGET_MARGIN * budget, f"memory_budget_gb={budget:g}, of {room}"
        else:
            lines.append(f"memory budget {budget:g} GiB is more than the device can give "
                         f"({limit:.1f} GiB); planning for {limit:.1f} GiB")
        _, plan, plan_lines = fastest_plan(plan, budget, limit)
        lines += plan_lines
    auto = cfg.data.batch_size == "auto"
    recommended = largest_batch(plan, limit)
    lever = best_lever(plan, limit, recommended)
    if auto:
        if recommended == 0:
            raise BadInput(f"batch_size=auto: not even one sequence is predicted to fit in "
                           f"{free_gb:.1f} GiB free; {_lever_fix(lever)}")
        plan = plan.replace(batch_size=recommended)
    prediction = predict(plan)
    lines = [_levers_line(cfg, plan), *lines, *prediction.lines()]
    if auto:
        lines.append(f"batch size: auto, so the recommended {recommended}")
    more = f" (with {lever[0]}: {lever[1]})" if lever else ""
    lines.append(f"recommended batch size: {recommended}{more} for {room}")
    return plan, PlanReport(prediction, recommended, lever, lines)


def _lever_fix(lever: tuple[str, int] | None) -> str:
    return f"use {lever[0]}" if lever else "use a smaller model or block_size"


def _levers_line(asked: TrainConfig, plan: Plan) -> str:
    on, levers = [], plan.levers
    if levers.lean_loss:
        on.append(f"lean loss{' (auto)' if asked.memory_levers.lean_loss is None else ''}")
    if levers.offload_activations:
        on.append("offload activations")
    if levers.optimizer_in_backward:
        on.append("optimizer in backward")
    if levers.activation_memory_budget < 1.0:
        on.append(f"compile memory budget {levers.activation_memory_budget:g}")
    auto = " (auto)" if asked.compile.enable is None else ""
    unit = f", {'whole model' if plan.compile_unit == 'model' else 'block by block'}" if plan.compile else ""
    return f"compile: {'on' if plan.compile else 'off'}{auto}{unit}; memory levers: {', '.join(on) or 'none'}"


def oom_advice(report: PlanReport, batch_size: int) -> tuple[int, str]:
    """After an out-of-memory at batch_size: the largest batch predicted to fit (below
    batch_size: the prediction itself may have missed), and what to run."""
    b = min(report.recommended, math.floor(HEADROOM["cuda"] * batch_size))  # OOM: CUDA only
    lever = f" (or {report.lever[0]}: {report.lever[1]})" if report.lever else ""
    if b:
        return b, f"--batch_size {b}{lever}"
    return 0, f"batch_size 1 does not fit either; {_lever_fix(report.lever)}"


def load_costs(path: Path = COSTS_FILE) -> dict:
    """plan_costs.json: {"hardware": str, "step_ratio": {plan label: ratio}}."""
    with open(path) as f:
        return json.load(f)


def write_costs(step_ms: dict[str, float], hardware: str, path: Path = COSTS_FILE) -> dict:
    """plan_costs.json from each plan's measured step time: its ratio to the fastest plan's."""
    fastest = min(step_ms.values())
    costs = {"hardware": hardware,
             "step_ratio": {label: round(ms / fastest, 3) for label, ms in step_ms.items()}}
    write_json(path, costs)
    return costs
