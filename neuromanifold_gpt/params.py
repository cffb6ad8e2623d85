"""params.yaml, read and validated: its sections, the device the runs land on, train.py's
arguments for the baseline and the checkpointed run of each model size (launch.py starts
them) and the verify criteria.

A params.yaml value written {cpu: A, cuda: B} means A on CPU and B on CUDA, for the device
the runs land on; a `verify` value may further be {POLICY: value, ...} per recompute policy
and then {SIZE: value, ...} per model size, each level optional, in that order."""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import fields
from pathlib import Path

import yaml

from .config.base import POLICIES, ActivationCheckpoint
from .config.cli import coerce, parse_args
from .errors import BadInput

DEVICES = ("cpu", "cuda")
RUNS = ("baseline", "checkpointed")
SECTIONS = ("data", "train", "sizes", "checkpointing", "verify")
DATA_KEYS = ("url", "sha256")
VERIFY_KEYS = ("threshold_pct", "expected_range_pct", "loss_tolerance")
# what params.yaml's `checkpointing:` (the checkpointed run only) may set
CHECKPOINTING_KEYS = ("gradient_checkpointing", *(f.name for f in fields(ActivationCheckpoint)))
# train.py flags set per run by the pipeline (and verify_gradient_checkpointing.py)
MAX_PARAMS_BYTES = 1 << 20  # far above any params file; parsing more is refused, not attempted
PER_RUN_FLAGS = ("gradient_checkpointing", "metrics_file", "memory_trace_file", "memory_timeline_file")


def load_params(*sections: str, path: str | Path = "params.yaml") -> dict:
    """params.yaml, checked to have the sections the caller reads."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path} not found; run from the project root or pass --params FILE")
    if path.stat().st_size > MAX_PARAMS_BYTES:
        raise BadInput(f"{path} is {path.stat().st_size:,} bytes, more than a params file's "
                       f"{MAX_PARAMS_BYTES:,}; restore it from git")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BadInput(f"{path} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    except ValueError:  # yaml converting an integer of more digits than Python converts
        raise BadInput(f"{path} holds a number with too many digits; fix the file") from None
    except RecursionError:
        raise BadInput(f"{path} is nested too deep to be a params file; fix the file") from None
    if not isinstance(params, dict):
        raise BadInput(f"{path} is not a mapping of sections (data:, train:, ...); restore it "
                       f"from git")
    for section in sections:
        if not isinstance(params.get(section), dict):
            raise BadInput(f"{path} has no `{section}:` section; restore it from git")
    return params


def pick(value, device_type: str, size: str | None = None, policy: str | None = None):
    """A params value, narrowed to this device ({cpu: .., cuda: ..}), then (given a policy) to
    this recompute policy ({block: .., mlp: .., ...}), then (given a size) to this size."""
    if isinstance(value, dict) and value and set(value) <= set(DEVICES):
        if device_type not in value:
            raise BadInput(f"params.yaml value {value} has no `{device_type}:` entry; add one")
        value = value[device_type]
    if policy is not None and isinstance(value, dict) and value and set(value) <= set(POLICIES):
        if policy not in value:
            raise BadInput(f"params.yaml value {value} has no `{policy}:` entry; add one")
        value = value[policy]
    if size is not None and isinstance(value, dict):
        if size not in value:
            raise BadInput(f"params.yaml value {value} has no entry for size {size!r}; add one")
        value = value[size]
    return value


def run_device_type(params: dict) -> str:
    """'cuda' or 'cpu': where the runs land (train.device: auto picks CUDA when there is one,
    as device.resolve_device does; train.py itself rejects a device it cannot use)."""
    device = str(params["train"].get("device", "auto"))
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.partition(":")[0]


def run_files(size: str, run: str, root: str | Path = ".") -> dict[str, Path]:
    """Where one run's metrics (JSON), memory per step and within one step (TSV) and log go."""
    root = Path(root)
    return {"metrics": root / "metrics" / "train" / size / f"{run}.json",
            "trace": root / "plots" / "train" / size / f"{run}.tsv",
            "timeline": root / "plots" / "step" / size / f"{run}.tsv",
            "log": root / "logs" / size / f"{run}.log"}


def _arg(key: str, value) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"--{key}={'none' if value is None else value}"


def training_args(params: dict, size: str, run: str, device_type: str,
                  files: dict[str, Path]) -> list[str]:
    """train.py's arguments for one run: the size's config file, then params.yaml's `train`,
    `sizes.SIZE` and (checkpointed run) `checkpointing` sections, later ones winning."""
    if size not in params["sizes"]:
        raise BadInput(f"size {size!r} is not in params.yaml's sizes ({', '.join(params['sizes'])})")
    settings = dict(params["sizes"][size] or {})
    if "config" not in settings:
        raise BadInput(f"params.yaml sizes.{size} has no `config:` (e.g. config/train_gpt2.py)")
    args = ["--config", str(settings.pop("config"))]
    checkpointing = (params["checkpointing"] if run == "checkpointed"
                     else {"gradient_checkpointing": False})
    other = [k for k in checkpointing if k not in CHECKPOINTING_KEYS]
    if other:  # a lever set for one run only would be credited to checkpointing
        raise BadInput(f"params.yaml checkpointing: may set only {', '.join(CHECKPOINTING_KEYS)}; "
                         f"move {', '.join(other)} to train: (both runs)")
    for section in (params["train"], settings, checkpointing):
        args += [_arg(k, pick(v, device_type)) for k, v in section.items() if k != "nproc"]
    return args + [_arg("metrics_file", files["metrics"]), _arg("memory_trace_file", files["trace"]),
                   _arg("memory_timeline_file", files["timeline"])]


def processes(params: dict, device_type: str) -> int:
    """params.yaml's train.nproc: processes per run (default 1)."""
    nproc = pick(params["train"].get("nproc", 1), device_type)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise BadInput(f"params.yaml train.nproc={nproc!r} must be a whole number >= 1")
    return nproc


def verify_criteria(params: dict, device_type: str, size: str, policy: str) -> dict:
    """params.yaml's verify values for one size, policy and device, checked: threshold_pct in
    [0, 100), expected_range_pct [low, high] within [0, 100] and loss_tolerance >= 0."""
    v, where = params["verify"], f"for {size}, policy {policy}, on {device_type}"
    try:
        threshold = _number(pick(v["threshold_pct"], device_type, size, policy))
        low, high = (_number(x) for x in pick(v["expected_range_pct"], device_type, size, policy))
        tolerance = _number(pick(v["loss_tolerance"], device_type, size, policy))
    except (KeyError, TypeError, ValueError) as e:
        raise BadInput(f"params.yaml verify section is incomplete or malformed {where} ({e}); it "
                       f"needs threshold_pct, expected_range_pct: [low, high], loss_tolerance, "
                       f"each a number") from None
    if not 0 <= threshold < 100:  # below 0, a run that used more memory would pass
        raise BadInput(f"params.yaml verify.threshold_pct {where} is {threshold:g}; it must be in "
                       f"[0, 100): a pass needs memory saved")
    if not 0 <= low <= high <= 100:
        raise BadInput(f"params.yaml verify.expected_range_pct {where} is [{low:g}, {high:g}]; "
                       f"write [low, high] with 0 <= low <= high <= 100")
    if tolerance < 0:
        raise BadInput(f"params.yaml verify.loss_tolerance {where} is {tolerance:g}; it must be >= 0")
    return {"threshold_pct": threshold, "expected_range_pct": (low, high), "loss_tolerance": tolerance}


def check_criteria(params: dict, device_type: str, size: str) -> None:
    """verify_criteria for every policy: any may be chosen (`dvc exp run -S ...`, or
    --checkpoint_policy for verify_gradient_checkpointing.py)."""
    for policy in POLICIES:
        verify_criteria(params, device_type, size, policy)


def _number(value) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):  # an integer beyond any float
            if math.isfinite(float(value)):
                return float(value)
    raise BadInput(f"{_short(value)} is not a finite number")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _only(section: dict, allowed, where: str, fix: str) -> None:
    unknown = [k for k in section if k not in allowed]
    if unknown:
        raise BadInput(f"params.yaml {where} has unknown key {unknown[0]!r} (allowed: "
                         f"{', '.join(allowed)}); {fix}")


def _device_forms(section: dict, where: str) -> None:
    """A dict value must be {cpu: A, cuda: B}: one file serves both kinds of machine."""
    for key, value in section.items():
        if isinstance(value, dict) and set(value) != set(DEVICES):
            raise BadInput(f"params.yaml {where}.{key} is {value}; write a plain value or "
                             f"{{cpu: A, cuda: B}} with both devices")


def validate(params: dict) -> None:
    """Every params.yaml value the stages read, checked for both devices before any stage
    runs, so a mistake fails with one line instead of after DVC has removed outputs."""
    if not isinstance(params, dict):
        raise BadInput("params.yaml is not a mapping of sections; restore it from git")
    _only(params, SECTIONS, "(top level)", "remove it or restore params.yaml from git")
    for section in SECTIONS:
        if not isinstance(params.get(section), dict) or not params[section]:
            raise BadInput(f"params.yaml has no `{section}:` section; restore it from git")
    data = params["data"]
    _only(data, DATA_KEYS, "data", "to prepare from a local copy of the corpus, set "
          "NEUROMANIFOLD_CORPUS=/path/to/input.txt instead")
    if not str(data.get("url", "")).startswith(("http://", "https://")):
        raise BadInput(f"params.yaml data.url={data.get('url')!r} must be an http(s) URL; "
                         f"restore it from git")
    if not re.fullmatch(r"[0-9a-f]{64}", str(data.get("sha256", ""))):
        raise BadInput(f"params.yaml data.sha256={data.get('sha256')!r} must be 64 hex digits; "
                         f"restore it from git")
    _only(params["verify"], VERIFY_KEYS, "verify", "remove it")
    sections = {"train": params["train"], "checkpointing": params["checkpointing"]}
    for size, settings in params["sizes"].items():
        if not isinstance(settings, dict):
            raise BadInput(f"params.yaml sizes.{size} must be a mapping with at least `config:`")
        sections[f"sizes.{size}"] = settings
    for where, section in sections.items():
        _device_forms(section, where)
        reserved = [k for k in section if k in PER_RUN_FLAGS[1:] or (k == "config" and where == "train")
                    or (k == "gradient_checkpointing" and where != "checkpointing")]
        if reserved:
            raise BadInput(f"params.yaml {where}.{reserved[0]} is set by the pipeline for each "
                             f"run; remove it")
    if params["checkpointing"].get("gradient_checkpointing") is not True:
        raise BadInput("params.yaml checkpointing.gradient_checkpointing must be true: it is "
                         "the checkpointed run's switch")
    for device_type in DEVICES:
        processes(params, device_type)
        for where, section in sections.items():
            for key, value in section.items():
                if key not in ("config", "nproc"):
                    coerce(key, pick(value, device_type), f"in params.yaml {where}")
        for size in params["sizes"]:
            for run in RUNS:
                args = training_args(params, size, run, device_type, run_files(size, run))
                try:
                    parse_args(args)
                except ValueError as e:
                    raise BadInput(f"params.yaml sizes.{size}, {run} run on {device_type}: {e}") from None
            check_criteria(params, device_type, size)
        for key in VERIFY_KEYS:
            _check_size_keys(params["verify"][key], params["sizes"], f"verify.{key}")


def _check_size_keys(value, sizes: dict, where: str) -> None:
    """A per-size verify value names only sizes that exist (a typo would be silently unused)."""
    for per_device in _narrowed(value, DEVICES):
        for v in _narrowed(per_device, POLICIES):
            if isinstance(v, dict):
                unknown = [k for k in v if k not in sizes]
                if unknown:
                    raise BadInput(f"params.yaml {where} names {unknown[0]!r}, which is neither a "
                                   f"size ({', '.join(sizes)}) nor a policy ({', '.join(POLICIES)}); "
                                   f"fix the name or remove it")


def _narrowed(value, keys) -> list:
    """The values under a {key: value} level of a params value, or the value itself."""
    return list(value.values()) if isinstance(value, dict) and value and set(value) <= set(keys) else [value]
