"""A run's metrics record: the one schema of the metrics file a training run writes
(train.py --metrics_file, metrics/train/SIZE/RUN.json), written by training and read, checked,
by verification, the report stage and the benchmarks.

Every outcome has the same fields: a run that ran out of CUDA memory (oom) or whose loss became
non-finite (nonfinite_loss) leaves the figures it never measured as null. Reading checks each
value's type and range, so a damaged or hand-edited file is bad input, never a figure; a record
that training builds out of range is a bug (ValueError, with its traceback)."""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .config.base import POLICIES
from .errors import BadInput
from .files import read_json, write_json

# Bounds that keep every figure derived from a record finite (a reduction, a ratio): far
# beyond any machine or run, far inside a float.
MAX_GIB = 2**20
MAX_COUNT = 2**53
MAX_MS = 10**9
MAX_LOSS = 10**6
# A JSON key that is not a Python name, kept as users know it.
JSON_KEYS = {"predicted_over_measured": "predicted/measured"}


@dataclass(frozen=True)
class RunRecord:
    preset: str  # the model preset trained (PRESETS in config/base.py)
    params: int | None = None  # parameter count
    gradient_checkpointing: bool | None = None  # whether the model was checkpointed
    policy: str | None = None  # the recompute policy, "none" without checkpointing
    checkpointed_blocks: int | None = None  # how many blocks were checkpointed
    batch_size: int | None = None  # sequences per micro-step
    block_size: int | None = None  # tokens per sequence
    gradient_accumulation_steps: int | None = None  # micro-steps per iteration, all ranks
    tokens_per_iter: int | None = None  # tokens per optimizer step, all ranks
    iters: int | None = None  # the iteration the run stopped at
    device: str | None = None  # cpu | cuda
    device_name: str | None = None  # the card's (or the CPU's) name
    dtype: str | None = None  # float32 | bfloat16
    torch_version: str | None = None  # torch.__version__
    git_commit: str | None = None  # HEAD of the checkout (null outside git)
    git_dirty: bool | None = None  # the training code differs from git_commit
    code_hash: str | None = None  # sha256 of the training code (provenance.code_hash)
    cuda_version: str | None = None  # torch.version.cuda (null on the CPU)
    world_size: int | None = None  # processes that trained
    parallelism: str | None = None  # none | ddp | fsdp
    peak_memory_gb: float | None = None  # the run's peak after warm-up, GiB, from peak_memory_source
    peak_memory_gb_per_rank: list[float] | None = None  # each rank's peak_memory_gb
    peak_reserved_gb: float | None = None  # peak held by the CUDA caching allocator, GiB
    peak_memory_source: str | None = None  # what measured peak_memory_gb
    peak_rss_gb: float | None = None  # the process's peak resident set, GiB (CPU runs)
    predicted_peak_gb: float | None = None  # the predictor's peak, GiB
    predicted_over_measured: float | None = None  # predicted / measured peak (CUDA only)
    recommended_batch_size: int | None = None  # largest batch predicted to fit (0: none fits)
    device_memory_gb: float | None = None  # the device's whole memory, GiB
    compile: bool | None = None  # torch.compile on
    compile_unit: str | None = None  # what one compiled graph holds: model | block (null uncompiled)
    cuda_graphs: bool | None = None  # the compiled code replayed as CUDA graphs
    lean_loss: bool | None = None  # the memory levers (config/base.py MemoryLevers) ...
    offload_activations: bool | None = None
    optimizer_in_backward: bool | None = None
    activation_memory_budget: float | None = None  # ... up to here
    step_time_ms: float | None = None  # median step time after warm-up
    tokens_per_sec: float | None = None  # tokens_per_iter / step time
    mfu: float | None = None  # model FLOPs utilisation (null for a device without a peak)
    final_train_loss: float | None = None  # the last evaluation's mean loss per split
    final_val_loss: float | None = None
    last_step_loss: float | None = None  # the last training step's loss
    oom: bool = False  # CUDA ran out of memory: the run has no figures
    nonfinite_loss: bool = False  # the loss became NaN or infinite at nonfinite_step
    nonfinite_step: int | None = None
    error: str | None = None  # the failure's message (oom or nonfinite_loss)

    def __post_init__(self):
        for f in fields(self):
            _check(f.name, getattr(self, f.name))
        if self.oom and self.nonfinite_loss:
            raise ValueError("oom and nonfinite_loss are both true")
        if self.nonfinite_loss and self.nonfinite_step is None:
            raise ValueError("nonfinite_loss is true but nonfinite_step is null")

    @property
    def finished(self) -> bool:
        """The run trained to its end (no out-of-memory, no non-finite loss)."""
        return not (self.oom or self.nonfinite_loss)

    def as_json(self) -> dict:
        """The record as its metrics file holds it."""
        return {JSON_KEYS.get(k, k): v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict, where: str = "metrics") -> RunRecord:
        names = {JSON_KEYS.get(f.name, f.name): f.name for f in fields(cls)}
        unknown = [k for k in data if k not in names]
        if unknown:
            raise BadInput(f"{where} has unknown key {unknown[0]!r}; it is not a run's metrics: "
                           f"re-run the training that writes it")
        try:
            return cls(**{names[k]: v for k, v in data.items()})
        except ValueError as e:  # a value __post_init__ refuses
            raise BadInput(f"{where}: {e}; it is corrupt: re-run the training that writes it") from None

    @classmethod
    def read(cls, path: str | Path) -> RunRecord:
        """A metrics file, checked whole."""
        return cls.from_json(read_json(path, required=("preset", "oom")), f"metrics file {path}")

    def write(self, path: str | Path) -> None:
        write_json(path, self.as_json())


# What a field's value may be besides its type: (test, the words for it).
def _within(low, high, low_open=False):
    return (lambda v: (low < v if low_open else low <= v) and v <= high,
            f"{'(' if low_open else '['}{low}, {high}]")


_GIB, _POSITIVE_GIB = _within(0, MAX_GIB), _within(0, MAX_GIB, low_open=True)
_POSITIVE_COUNT, _COUNT = _within(1, MAX_COUNT), _within(0, MAX_COUNT)
RANGES = {
    **dict.fromkeys(("params", "batch_size", "block_size", "gradient_accumulation_steps",
                     "tokens_per_iter", "world_size"), _POSITIVE_COUNT),
    **dict.fromkeys(("checkpointed_blocks", "iters", "recommended_batch_size", "nonfinite_step"),
                    _COUNT),
    **dict.fromkeys(("peak_memory_gb", "peak_reserved_gb", "peak_rss_gb"), _POSITIVE_GIB),
    **dict.fromkeys(("predicted_peak_gb", "device_memory_gb"), _GIB),
    "peak_memory_gb_per_rank": (lambda v: all(_POSITIVE_GIB[0](x) for x in v), f"GiB in {_POSITIVE_GIB[1]}"),
    **dict.fromkeys(("predicted_over_measured", "mfu"), _within(0, MAX_COUNT)),
    "activation_memory_budget": _within(0, 1),
    "step_time_ms": _within(0, MAX_MS, low_open=True),
    "tokens_per_sec": _within(0, MAX_COUNT, low_open=True),
    **dict.fromkeys(("final_train_loss", "final_val_loss", "last_step_loss"), _within(0, MAX_LOSS)),
    "device": (lambda v: v in ("cpu", "cuda"), "cpu or cuda"),
    "policy": (lambda v: v in ("none", *POLICIES), f"one of none, {', '.join(POLICIES)}"),
    "dtype": (lambda v: v in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
    "parallelism": (lambda v: v in ("none", "ddp", "fsdp"), "none, ddp or fsdp"),
    "compile_unit": (lambda v: v in ("model", "block"), "model or block"),
}
_TYPES = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string",
          list: "a list of finite numbers"}


def _of_type(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        try:  # an integer beyond any float is not a figure either
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        except OverflowError:
            return False
    if kind is list:
        return isinstance(value, list) and all(_of_type(x, float) for x in value)
    return isinstance(value, kind)


def _check(name: str, value) -> None:
    hint = _HINTS[name]
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    kind = typing.get_args(hint)[0] if optional else hint
    kind = typing.get_origin(kind) or kind
    if value is None and optional:
        return
    test, words = RANGES.get(name, (lambda v: True, ""))
    if not _of_type(value, kind) or not test(value):
        expected = (f"{_TYPES[kind]} in {words}" if words.startswith(("[", "("))
                    else words or _TYPES[kind])
        raise ValueError(f"{JSON_KEYS.get(name, name)} is {_short(value)}, not {expected}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


_HINTS = typing.get_type_hints(RunRecord)
