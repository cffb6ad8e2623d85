"""Typed configuration: the model's architecture (NeuroManifoldConfig), the training run
(TrainConfig, one section a concern), the one table of model presets and the one checker of
the rules that tie fields of different sections together (`check_rules`).

Every field of every section is set by its own flat flag, as nanoGPT spells it
(`--checkpoint_policy mlp`, `--max_iters 10`, `compile = True`); `flags()` lists them."""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Literal

from ..errors import BadInput

# One source of truth for model sizes. batch_size/block_size are the per-device defaults
# a run uses when it does not set them: (CUDA, CPU).
PRESETS: dict[str, dict] = {
    "shakespeare_char": dict(n_layer=6, n_head=6, n_embd=384, dropout=0.2, bias=False,
                             cuda=(64, 256), cpu=(8, 128)),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, dropout=0.0, bias=True,
                 cuda=(12, 1024), cpu=(2, 128)),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, dropout=0.0, bias=True,
                        cuda=(12, 1024), cpu=(1, 128)),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, dropout=0.0, bias=True,
                       cuda=(8, 1024), cpu=(1, 64)),
}

Policy = Literal["block", "attention", "mlp", "selective"]
POLICIES: tuple[str, ...] = typing.get_args(Policy)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise BadInput(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def _check_positive(name: str, value) -> None:
    if value is not None and value <= 0:
        raise BadInput(f"{name}={value} must be > 0")


def _check_range(name: str, value, low: float, high: float, high_open: bool = False) -> None:
    if value is not None and not (low <= value < high if high_open else low <= value <= high):
        raise BadInput(f"{name}={value} must be in [{low:g}, {high:g}{')' if high_open else ']'}")


def _check_fields(section) -> None:
    """Every float field is a finite number (inf or nan would train to a NaN loss instead of
    failing here), and every field typed with Literal holds one of its names."""
    hints = typing.get_type_hints(type(section))
    for f in fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise BadInput(f"{_flag(f)}={value} must be a finite number")
        choices = [a for a in typing.get_args(hints[f.name])
                   if typing.get_origin(a) is Literal] or [hints[f.name]]
        if typing.get_origin(choices[0]) is Literal and value is not None:
            _check_choice(_flag(f), value, typing.get_args(choices[0]))


def _flag(f) -> str:
    """The flat flag that sets a section's field: its name, unless the field names another."""
    return f.metadata.get("flag", f.name)


# -- the model -----------------------------------------------------------------------------
@dataclass
class NeuroManifoldConfig:
    """The model: GPT-2's architecture, and whether its activations are checkpointed (which
    ones is the run's plan: TrainConfig.activation_checkpoint)."""

    block_size: int = 256  # longest sequence the model sees (positional table size)
    vocab_size: int = 65  # real vocabulary; the embedding is padded to a multiple of 64
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads per block
    n_embd: int = 384  # residual stream width
    dropout: float = 0.0  # dropout probability in attention, MLP and embeddings
    bias: bool = False  # biases in Linear and LayerNorm layers (GPT-2 has them)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory

    def __post_init__(self):
        _check_fields(self)
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            _check_positive(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise BadInput(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                           f"pick n_embd as a multiple of n_head")
        _check_range("dropout", self.dropout, 0.0, 1.0, high_open=True)

    @property
    def padded_vocab_size(self) -> int:
        return 64 * math.ceil(self.vocab_size / 64)


# -- the run's sections --------------------------------------------------------------------
@dataclass
class Data:
    """Where the tokens come from and how many a step takes."""

    dataset: str = "shakespeare_char"  # folder under data_dir holding train.bin/val.bin/meta.json
    data_dir: str = "data"  # where prepared datasets live
    batch_size: int | str | None = None  # sequences per micro-step (None = the preset's for the
    # device, auto = the largest predicted to fit, as the startup report recommends)
    memory_budget_gb: float | None = None  # pick the fastest plan (policy, lean loss, levers)
    # predicted to fit in this many GiB; it replaces the checkpointing and lever settings
    block_size: int | None = None  # tokens per sequence (None = the preset's for the device)
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step (all ranks together)

    def __post_init__(self):
        _check_fields(self)
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            raise BadInput(f"batch_size={self.batch_size!r} is not valid: expected an integer or auto")
        if self.batch_size != "auto":
            _check_positive("batch_size", self.batch_size)
        _check_positive("memory_budget_gb", self.memory_budget_gb)
        _check_positive("block_size", self.block_size)
        _check_positive("gradient_accumulation_steps", self.gradient_accumulation_steps)


@dataclass
class Model:
    """The model's size: a preset, with any of its fields overridden."""

    preset: str = "shakespeare_char"  # model size: one of PRESETS
    n_layer: int | None = None  # override the preset's layer count
    n_head: int | None = None  # override the preset's head count
    n_embd: int | None = None  # override the preset's width
    dropout: float | None = None  # override the preset's dropout
    bias: bool | None = None  # override the preset's bias setting

    def __post_init__(self):
        _check_fields(self)
        _check_choice("preset", self.preset, tuple(PRESETS))
        for name in ("n_layer", "n_head", "n_embd"):
            _check_positive(name, getattr(self, name))


@dataclass
class Optimizer:
    """AdamW and its learning-rate schedule."""

    max_iters: int = 5000  # optimizer steps
    learning_rate: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # floor of the cosine decay
    warmup_iters: int = 100  # linear warm-up steps
    lr_decay_iters: int | None = None  # end of the cosine decay (None = max_iters)
    decay_lr: bool = True  # cosine decay after warm-up (False = constant learning rate)
    weight_decay: float = 0.1  # AdamW weight decay on 2-D weights
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    grad_clip: float = 1.0  # clip the gradient norm to this (0 = off)

    def __post_init__(self):
        _check_fields(self)
        _check_positive("max_iters", self.max_iters)
        _check_positive("lr_decay_iters", self.lr_decay_iters)
        _check_positive("learning_rate", self.learning_rate)
        for name in ("min_lr", "weight_decay", "grad_clip", "warmup_iters"):
            if getattr(self, name) < 0:
                raise BadInput(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("beta1", "beta2"):
            _check_range(name, getattr(self, name), 0.0, 1.0, high_open=True)


@dataclass
class Evaluation:
    """Evaluation, logging and what a run writes."""

    eval_interval: int = 250  # evaluate train/val loss every this many steps (and at the end)
    eval_iters: int = 20  # batches per split in an evaluation (0 = no evaluation)
    log_interval: int = 10  # one log line every this many steps
    out_dir: str = "out"  # snapshots go here
    save_snapshot: bool = False  # save out_dir/snapshot.pt at each evaluation
    init_from: Literal["scratch", "resume"] = "scratch"  # resume: from out_dir/snapshot.pt
    metrics_file: str = ""  # write the run's metrics JSON here ("" = do not write)
    memory_trace_file: str = ""  # write per-step memory as TSV here ("" = do not write)
    memory_timeline_file: str = ""  # write memory within one training step as TSV here
    # (timeline.py says which step)

    def __post_init__(self):
        _check_fields(self)
        _check_positive("eval_interval", self.eval_interval)
        _check_positive("log_interval", self.log_interval)
        if self.eval_iters < 0:
            raise BadInput(f"eval_iters={self.eval_iters} must be >= 0 (0 = no evaluation)")


@dataclass
class System:
    """Where and in what precision the run computes."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bf16 autocast on CUDA, fp32 on CPU. No float16: it needs loss scaling (GradScaler),
    # which bf16 does without
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    seed: int = 1337  # seeds weights, dropout and the data order

    def __post_init__(self):
        _check_fields(self)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise BadInput(f"device={self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if not 0 <= self.seed < 2**32:
            raise BadInput(f"seed={self.seed} must be in [0, 2**32)")


@dataclass
class Parallelism:
    """Data parallelism, only under torchrun."""

    fsdp: bool = False  # shard params, grads and optimizer state with FSDP2 instead of DDP
    dist_timeout: int = 600  # seconds a collective waits for the other ranks before failing

    def __post_init__(self):
        _check_fields(self)
        _check_positive("dist_timeout", self.dist_timeout)


@dataclass
class ActivationCheckpoint:
    """Which activations are recomputed in backward, when gradient_checkpointing is on."""

    checkpoint_policy: Policy = "block"  # what is recomputed: block | attention | mlp | selective
    checkpoint_every: int = 1  # checkpoint every k-th block only (1 = every block)
    checkpoint_layers: int | None = None  # checkpoint only the first N blocks (None = all)

    def __post_init__(self):
        _check_fields(self)
        _check_positive("checkpoint_every", self.checkpoint_every)
        _check_positive("checkpoint_layers", self.checkpoint_layers)


@dataclass
class MemoryLevers:
    """Memory savers beyond checkpointing (neuromanifold_gpt/loss.py and levers.py)."""

    lean_loss: bool | None = None  # head + cross-entropy without the (B, T, V) logits (None =
    # on CUDA with a GPT-2-sized vocabulary, or as a memory_budget_gb plan chooses; planner.py)
    loss_chunk_tokens: int | None = None  # tokens of one lean-loss chunk (None = loss.CHUNK_BYTES)
    # the lean loss's kernel: ours (chunked), or a maintained library's fused kernel
    # (pip install -e ".[compare]", Linux with a CUDA torch)
    loss_kernel: Literal["chunked", "cce", "cce_filtered", "liger"] = "chunked"
    offload_activations: bool = False  # keep saved activations (checkpointed: block inputs) in host RAM
    optimizer_in_backward: bool = False  # step each weight once its grad is ready, then free it
    activation_memory_budget: float = 1.0  # compile's saved-activation budget (<1 recomputes more)

    def __post_init__(self):
        _check_fields(self)
        _check_positive("loss_chunk_tokens", self.loss_chunk_tokens)
        if not 0.0 <= self.activation_memory_budget <= 1.0:
            raise BadInput(f"activation_memory_budget={self.activation_memory_budget} must be in "
                           f"[0, 1] (1 = compile's default, 0 = recompute all it can)")


@dataclass
class Compile:
    """torch.compile: whether, over what, and whether its code replays as CUDA graphs."""

    # None = on CUDA for models large enough for it to pay (planner.COMPILE_MIN_PARAMS)
    enable: bool | None = field(default=None, metadata={"flag": "compile"})
    # what one compiled graph holds: the whole model, or each block and the loss alone
    # (auto = block by block with the lean loss or FSDP2, else the whole model)
    compile_unit: Literal["auto", "model", "block"] = "auto"
    # replay compiled code as CUDA graphs (None = where it can: one CUDA process, one micro-step
    # a step, no offloaded activations)
    cuda_graphs: bool | None = None

    def __post_init__(self):
        _check_fields(self)


SECTIONS = {"data": Data, "model": Model, "optimizer": Optimizer, "evaluation": Evaluation,
            "system": System, "parallelism": Parallelism,
            "activation_checkpoint": ActivationCheckpoint, "memory_levers": MemoryLevers,
            "compile": Compile}


def check_rules(levers: MemoryLevers, compile: bool | None, grad_clip: float, accumulation: int,
                world_size: int = 1, fsdp: bool = False, compile_unit: str = "auto",
                cuda_graphs: bool | None = None) -> str | None:
    """The one home of every rule that ties settings of different sections together: the first
    one broken, as the line that names it and the fix, or None. The config checks it as it is
    made (one process), the planner for the plan it resolves and each plan it weighs, and the
    bench for each of its rows."""
    if levers.activation_memory_budget < 1.0 and compile is False:
        return (f"activation_memory_budget={levers.activation_memory_budget} acts only on "
                f"compiled blocks; set compile=true or the budget to 1")
    if compile is False and (compile_unit != "auto" or cuda_graphs):
        return "compile_unit and cuda_graphs shape compiled code; set compile=true or leave them at auto"
    if fsdp and compile_unit == "model":
        return ("compile_unit=model cannot hold FSDP2's hooks, which gather each block's parameters "
                "between blocks; use compile_unit=block or auto")
    if cuda_graphs and (fsdp or world_size > 1 or accumulation > 1):
        return ("cuda_graphs=true needs a single process and one micro-step a step (a replay would "
                "overwrite the gradients being accumulated); leave cuda_graphs at auto")
    if levers.optimizer_in_backward and grad_clip > 0:
        return ("optimizer_in_backward=true steps each weight before the global gradient norm "
                "is known; set grad_clip=0")
    if levers.optimizer_in_backward and accumulation > 1:
        return ("optimizer_in_backward=true steps after every backward; set "
                "gradient_accumulation_steps=1 (raise batch_size instead)")
    if levers.optimizer_in_backward and world_size > 1:
        return ("optimizer_in_backward=true would step on this rank's gradients before they are "
                "reduced across ranks; use it in a single process")
    if accumulation % world_size:
        return (f"gradient_accumulation_steps={accumulation} is the global count of micro-steps "
                f"and must divide among the {world_size} ranks; use a multiple of {world_size}")
    return None


@dataclass
class TrainConfig:
    """One training run: the seed's gradient_checkpointing switch, and a section a concern.
    Model fields left at None come from the preset."""

    gradient_checkpointing: bool = False  # passed to the model config
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    evaluation: Evaluation = field(default_factory=Evaluation)
    system: System = field(default_factory=System)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    memory_levers: MemoryLevers = field(default_factory=MemoryLevers)
    compile: Compile = field(default_factory=Compile)

    def __post_init__(self):
        if self.data.batch_size == "auto" and self.data.memory_budget_gb is not None:
            raise BadInput("batch_size=auto and memory_budget_gb both size the run; set one of them")
        self.check_rules(world_size=1)
        self.model_config(vocab_size=65)  # validates the combined model settings early

    def check_rules(self, world_size: int) -> None:
        """The cross-field rules (check_rules) for a run of world_size processes."""
        broken = check_rules(self.memory_levers, self.compile.enable, self.optimizer.grad_clip,
                             self.data.gradient_accumulation_steps, world_size, self.parallelism.fsdp,
                             self.compile.compile_unit, self.compile.cuda_graphs)
        if broken:
            raise BadInput(broken)

    @classmethod
    def from_flags(cls, **flags) -> TrainConfig:
        """A TrainConfig from flat flag names, as the CLI and config files spell them
        (checkpoint_policy="mlp", lean_loss=True, compile=True)."""
        sections = {name: section(**{f.name: flags.pop(_flag(f)) for f in fields(section)
                                     if _flag(f) in flags})
                     for name, section in SECTIONS.items()}
        return cls(**flags, **sections)

    def to_dict(self) -> dict:
        """The flat flags: the inverse of from_flags."""
        flat = {"gradient_checkpointing": self.gradient_checkpointing}
        for name in SECTIONS:
            section = getattr(self, name)
            flat.update({_flag(f): getattr(section, f.name) for f in fields(section)})
        return flat

    def with_flags(self, **flags) -> TrainConfig:
        """This config with some flat flags changed, each in its own section."""
        changed = {}
        for name, section in SECTIONS.items():
            mine = {f.name: flags.pop(_flag(f)) for f in fields(section) if _flag(f) in flags}
            if mine:
                changed[name] = replace(getattr(self, name), **mine)
        return replace(self, **flags, **changed)

    def resolved_batch(self, device_type: str) -> tuple[int, int]:
        """(batch_size, block_size) with the preset's per-device defaults filled in, also for an
        auto batch (the planner sizes it once the plan is known)."""
        default_b, default_t = PRESETS[self.model.preset]["cuda" if device_type == "cuda" else "cpu"]
        batch = None if self.data.batch_size == "auto" else self.data.batch_size
        return batch or default_b, self.data.block_size or default_t

    def model_config(self, vocab_size: int, block_size: int | None = None) -> NeuroManifoldConfig:
        arch = {k: v for k, v in PRESETS[self.model.preset].items() if k not in ("cuda", "cpu")}
        for name in ("n_layer", "n_head", "n_embd", "dropout", "bias"):
            if getattr(self.model, name) is not None:
                arch[name] = getattr(self.model, name)
        return NeuroManifoldConfig(
            block_size=block_size or self.data.block_size or PRESETS[self.model.preset]["cuda"][1],
            vocab_size=vocab_size, gradient_checkpointing=self.gradient_checkpointing, **arch)


def flags() -> dict[str, object]:
    """Every flat flag -> its type hint: the seed's switch, then each section's fields."""
    out = {"gradient_checkpointing": bool}
    for section in SECTIONS.values():
        hints = typing.get_type_hints(section)
        out.update({_flag(f): hints[f.name] for f in fields(section)})
    return out
