"""Typed configuration: the model (NeuroManifoldConfig), the training run (TrainConfig), the
two sections both hold whole (ActivationCheckpoint, MemoryLevers) and the one table of model
presets."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace

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

POLICIES = ("block", "attention", "mlp", "selective")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise BadInput(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def _check_positive(name: str, value) -> None:
    if value is not None and value <= 0:
        raise BadInput(f"{name}={value} must be > 0")


def _check_range(name: str, value, low: float, high: float, high_open: bool = False) -> None:
    if value is not None and not (low <= value < high if high_open else low <= value <= high):
        raise BadInput(f"{name}={value} must be in [{low:g}, {high:g}{')' if high_open else ']'}")


def _check_finite(section) -> None:
    """Every float field of a config section is a finite number: inf or nan would train to a
    NaN loss instead of failing here."""
    for f in fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise BadInput(f"{f.name}={value} must be a finite number")


@dataclass
class ActivationCheckpoint:
    """Which activations are recomputed in backward, when gradient_checkpointing is on."""

    checkpoint_policy: str = "block"  # what is recomputed: block | attention | mlp | selective
    checkpoint_every: int = 1  # checkpoint every k-th block only (1 = every block)
    checkpoint_layers: int | None = None  # checkpoint only the first N blocks (None = all)

    def __post_init__(self):
        _check_choice("checkpoint_policy", self.checkpoint_policy, POLICIES)
        _check_positive("checkpoint_every", self.checkpoint_every)
        _check_positive("checkpoint_layers", self.checkpoint_layers)


@dataclass
class MemoryLevers:
    """Memory savers beyond checkpointing (neuromanifold_gpt/loss.py and levers.py)."""

    lean_loss: bool | None = None  # head + cross-entropy without the (B, T, V) logits (None =
    # on CUDA with a GPT-2-sized vocabulary, or as a memory_budget_gb plan chooses; planner.py)
    offload_activations: bool = False  # keep saved activations (checkpointed: block inputs) in host RAM
    optimizer_in_backward: bool = False  # step each weight once its grad is ready, then free it
    activation_memory_budget: float = 1.0  # compile's saved-activation budget (<1 recomputes more)

    def __post_init__(self):
        _check_finite(self)
        if not 0.0 <= self.activation_memory_budget <= 1.0:
            raise BadInput(f"activation_memory_budget={self.activation_memory_budget} must be in "
                             f"[0, 1] (1 = compile's default, 0 = recompute all it can)")


# TrainConfig's sections: each field is set by its own flat flag (--checkpoint_policy mlp)
SECTIONS = {"activation_checkpoint": ActivationCheckpoint, "memory_levers": MemoryLevers}


@dataclass
class NeuroManifoldConfig:
    """The model: GPT-2 architecture plus how its activations are checkpointed."""

    block_size: int = 256  # longest sequence the model sees (positional table size)
    vocab_size: int = 65  # real vocabulary; the embedding is padded to a multiple of 64
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads per block
    n_embd: int = 384  # residual stream width
    dropout: float = 0.0  # dropout probability in attention, MLP and embeddings
    bias: bool = False  # biases in Linear and LayerNorm layers (GPT-2 has them)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    # which activations are recomputed when gradient_checkpointing is true
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    memory_levers: MemoryLevers = field(default_factory=MemoryLevers)  # the model reads lean_loss

    def __post_init__(self):
        _check_finite(self)
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            _check_positive(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise BadInput(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"pick n_embd as a multiple of n_head")
        _check_range("dropout", self.dropout, 0.0, 1.0, high_open=True)

    @property
    def padded_vocab_size(self) -> int:
        return 64 * math.ceil(self.vocab_size / 64)


@dataclass
class TrainConfig:
    """One training run. Model fields left at None come from the preset."""

    # data and outputs
    dataset: str = "shakespeare_char"  # folder under data_dir holding train.bin/val.bin/meta.json
    data_dir: str = "data"  # where prepared datasets live
    out_dir: str = "out"  # snapshots go here
    metrics_file: str = ""  # write the run's metrics JSON here ("" = do not write)
    memory_trace_file: str = ""  # write per-step memory as TSV here ("" = do not write)
    memory_timeline_file: str = ""  # write memory against time within one extra step as TSV here
    # model
    preset: str = "shakespeare_char"  # model size: one of PRESETS
    n_layer: int | None = None  # override the preset's layer count
    n_head: int | None = None  # override the preset's head count
    n_embd: int | None = None  # override the preset's width
    dropout: float | None = None  # override the preset's dropout
    bias: bool | None = None  # override the preset's bias setting
    gradient_checkpointing: bool = False  # passed to the model config
    # which activations are recomputed; passed whole to the model config
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    memory_levers: MemoryLevers = field(default_factory=MemoryLevers)  # beyond checkpointing
    # batch
    batch_size: int | str | None = None  # sequences per micro-step (None = the preset's for the
    # device, auto = the largest predicted to fit, as the startup report recommends)
    memory_budget_gb: float | None = None  # pick the fastest plan (policy, lean loss, levers)
    # predicted to fit in this many GiB; it replaces the checkpointing and lever settings
    block_size: int | None = None  # tokens per sequence (None = the preset's for the device)
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    # optimizer and schedule
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
    # evaluation, logging, snapshots
    eval_interval: int = 250  # evaluate train/val loss every this many steps (and at the end)
    eval_iters: int = 20  # batches per split in an evaluation
    log_interval: int = 10  # one log line every this many steps
    save_snapshot: bool = False  # save out_dir/snapshot.pt at each evaluation
    init_from: str = "scratch"  # scratch | resume (from out_dir/snapshot.pt)
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool | None = None  # torch.compile the model, loss included (None = on CUDA for
    # models large enough for it to pay, see neuromanifold_gpt/planner.py)
    seed: int = 1337  # seeds weights, dropout and the data order
    # distributed (only under torchrun)
    fsdp: bool = False  # shard params, grads and optimizer state with FSDP2 instead of DDP
    dist_timeout: int = 600  # seconds a collective waits for the other ranks before failing

    def __post_init__(self):
        _check_finite(self)
        _check_choice("preset", self.preset, tuple(PRESETS))
        _check_choice("init_from", self.init_from, ("scratch", "resume"))
        # no float16: it needs loss scaling (GradScaler), which bf16 does without
        _check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16"))
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise BadInput(f"device={self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            raise BadInput(f"batch_size={self.batch_size!r} is not valid: expected an integer or auto")
        if self.batch_size == "auto" and self.memory_budget_gb is not None:
            raise BadInput("batch_size=auto and memory_budget_gb both size the run; set one of them")
        _check_positive("memory_budget_gb", self.memory_budget_gb)
        for name in ("n_layer", "n_head", "n_embd", "block_size",
                     "gradient_accumulation_steps", "max_iters", "eval_interval", "eval_iters",
                     "log_interval", "lr_decay_iters", "dist_timeout"):
            _check_positive(name, getattr(self, name))
        if self.batch_size != "auto":
            _check_positive("batch_size", self.batch_size)
        _check_positive("learning_rate", self.learning_rate)
        for name in ("min_lr", "weight_decay", "grad_clip", "warmup_iters"):
            if getattr(self, name) < 0:
                raise BadInput(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("beta1", "beta2"):
            _check_range(name, getattr(self, name), 0.0, 1.0, high_open=True)
        if not 0 <= self.seed < 2**32:
            raise BadInput(f"seed={self.seed} must be in [0, 2**32)")
        levers = self.memory_levers
        if levers.activation_memory_budget < 1.0 and self.compile is False:
            raise BadInput(f"activation_memory_budget={levers.activation_memory_budget} acts only "
                             f"on compiled blocks; set compile=true or the budget to 1")
        if levers.optimizer_in_backward and self.grad_clip > 0:
            raise BadInput("optimizer_in_backward=true steps each weight before the global "
                             "gradient norm is known; set grad_clip=0")
        if levers.optimizer_in_backward and self.gradient_accumulation_steps > 1:
            raise BadInput("optimizer_in_backward=true steps after every backward; set "
                             "gradient_accumulation_steps=1 (raise batch_size instead)")
        self.model_config(vocab_size=65)  # validates the combined model settings early

    @classmethod
    def from_flags(cls, **flags) -> TrainConfig:
        """A TrainConfig from flat flag names, as the CLI and config files spell them
        (checkpoint_policy="mlp", lean_loss=True): each section's flags go to that section."""
        sections = {name: section(**{f.name: flags.pop(f.name) for f in fields(section)
                                     if f.name in flags})
                    for name, section in SECTIONS.items()}
        return cls(**flags, **sections)

    def to_dict(self) -> dict:
        """The flat flags: the inverse of from_flags."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in SECTIONS}
        for name in SECTIONS:
            section = getattr(self, name)
            flat.update({f.name: getattr(section, f.name) for f in fields(section)})
        return flat

    def resolved_batch(self, device_type: str) -> tuple[int, int]:
        """(batch_size, block_size) with the preset's per-device defaults filled in."""
        default_b, default_t = PRESETS[self.preset]["cuda" if device_type == "cuda" else "cpu"]
        return self.batch_size or default_b, self.block_size or default_t

    def model_config(self, vocab_size: int, block_size: int | None = None) -> NeuroManifoldConfig:
        preset = {k: v for k, v in PRESETS[self.preset].items() if k not in ("cuda", "cpu")}
        for name in ("n_layer", "n_head", "n_embd", "dropout", "bias"):
            if getattr(self, name) is not None:
                preset[name] = getattr(self, name)
        return NeuroManifoldConfig(
            block_size=block_size or self.block_size or PRESETS[self.preset]["cuda"][1],
            vocab_size=vocab_size,
            gradient_checkpointing=self.gradient_checkpointing,
            activation_checkpoint=self.activation_checkpoint,
            # None (auto) is resolved by the planner before a run; the model reads a bool
            memory_levers=replace(self.memory_levers, lean_loss=bool(self.memory_levers.lean_loss)),
            **preset,
        )

