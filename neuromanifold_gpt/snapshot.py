"""Snapshots for init_from=resume: model and optimizer state (full, unsharded), the step and
every rank's RNG state (each rank has its own data stream and dropout masks), in one file
read back with weights_only=True. A file that is not such a snapshot, or holds values no run
writes (a negative step, a non-finite weight), is one clear error."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from . import distributed
from .distributed import DistInfo
from .errors import BadInput
from .files import atomic_path

KEYS = ("model", "optimizer", "iter_num", "config", "rng")
# the settings that shape the model's tensors, named when a snapshot does not fit the model
MODEL_SETTINGS = ("preset", "dataset", "n_layer", "n_head", "n_embd", "bias", "block_size")


def snapshot_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / "snapshot.pt"


def save_snapshot(path: Path, model, optimizer, generator: torch.Generator, iter_num: int,
                  config: dict, device: torch.device, dist: DistInfo) -> None:
    """Every rank takes part (FSDP2 gathers the shards); rank 0 writes."""
    model_state, optimizer_state = distributed.full_state_dicts(model, optimizer)
    rng = {"cpu": torch.get_rng_state(), "data": generator.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    rng_per_rank = distributed.gather(rng)
    if not dist.is_main:
        return
    state = {"model": model_state, "optimizer": optimizer_state, "iter_num": iter_num,
             "config": config, "rng": rng_per_rank}
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # torch reports a failed write (a full disk) as RuntimeError
            raise OSError(str(e).splitlines()[0]) from None


def _unreadable(path: Path, why: str) -> BadInput:
    return BadInput(f"snapshot {path} {why}; delete it and train again with --save_snapshot true, "
                      f"or use --init_from scratch")


def _largest(model) -> int:
    """Bytes a snapshot of `model` can hold at most: the weights and AdamW's two moments, with
    room for the RNG states and the config."""
    return 4 * sum(t.numel() * t.element_size() for t in model.state_dict().values()) + 2**26


def _read(path: Path, largest: int) -> dict:
    if not path.is_file():
        raise BadInput(f"init_from=resume but {path} does not exist; train with "
                         f"--save_snapshot true first or use --init_from scratch")
    size = path.stat().st_size
    if size == 0:
        raise _unreadable(path, "is empty")
    if size > largest:
        raise BadInput(f"snapshot {path} is {size:,} bytes, more than a snapshot of this model "
                         f"can be ({largest:,}); resume with the settings it was saved with, or "
                         f"use --init_from scratch")
    try:
        with warnings.catch_warnings():  # torch warns about files it is about to refuse
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's message advises weights_only=False, which must never be taken
        raise _unreadable(path, "is truncated or not a snapshot written by train.py") from None
    if not isinstance(state, dict) or not set(KEYS) <= set(state):
        raise _unreadable(path, "is not a snapshot written by train.py")
    _check(path, state)
    return state


def _tensors(value, depth: int = 4):
    """(key, tensor) of every tensor in nested dicts and lists, at most `depth` levels down
    (the optimizer's state is three); deeper nesting is no snapshot of ours."""
    if depth == 0:
        raise ValueError("nested deeper than a snapshot's")
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(item, torch.Tensor):
            yield key, item
        elif isinstance(item, (dict, list, tuple)):
            yield from _tensors(item, depth - 1)


def _check(path: Path, state: dict) -> None:
    """The snapshot's values, each checked for type and range as save_snapshot writes them."""
    config, model, iter_num, rng = state["config"], state["model"], state["iter_num"], state["rng"]
    max_iters = config.get("max_iters") if isinstance(config, dict) else None
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise _unreadable(path, "holds no valid config (max_iters)")
    if isinstance(iter_num, bool) or not isinstance(iter_num, int) or not 0 <= iter_num <= max_iters:
        raise _unreadable(path, f"holds step {iter_num!r}, not one in [0, {max_iters}] (its "
                                f"max_iters)")
    if not (isinstance(model, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in model.items())):
        raise _unreadable(path, "holds no model state (names and tensors)")
    if not (isinstance(rng, list) and rng and all(
            isinstance(r, dict) and all(isinstance(r.get(k), torch.Tensor) for k in ("cpu", "data"))
            for r in rng)):
        raise _unreadable(path, "holds no RNG states")
    if not isinstance(state["optimizer"], dict):
        raise _unreadable(path, "holds no optimizer state")
    try:
        tensors = [*model.items(), *_tensors(state["optimizer"])]
    except ValueError as e:
        raise _unreadable(path, f"holds an optimizer state {e}") from None
    for key, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _unreadable(path, f"holds a non-finite (NaN or infinite) {key}")
        if key == "step" and bool((t < 0).any()):  # AdamW's count of steps taken
            raise _unreadable(path, "holds a negative optimizer step")


def load_snapshot(path: Path, model, optimizer, generator: torch.Generator, device: torch.device,
                  dist: DistInfo, config: dict) -> int:
    """Restore the state save_snapshot wrote; returns the step to resume from. `config` is
    this run's (TrainConfig.to_dict()), to name the settings a mismatched snapshot differs in."""
    state = _read(path, _largest(model))
    if len(state["rng"]) != dist.world_size:
        raise BadInput(f"{path} was written by {len(state['rng'])} process(es), "
                         f"this run has {dist.world_size}; resume with the same number "
                         f"(torchrun --nproc_per_node) or use --init_from scratch")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in state["model"].items() if isinstance(v, torch.Tensor)}
    if saved != shapes:
        old = state["config"] if isinstance(state["config"], dict) else {}
        differ = [f"{k} {old.get(k)} vs {config.get(k)}" for k in MODEL_SETTINGS
                  if old.get(k) != config.get(k)]
        raise BadInput(f"snapshot {path} holds another model "
                         f"({', '.join(differ) or 'other tensor shapes'}); resume with the settings "
                         f"it was saved with, or use --init_from scratch")
    try:
        distributed.load_full_state_dicts(model, optimizer, state["model"], state["optimizer"])
        rng = state["rng"][dist.rank]
        torch.set_rng_state(rng["cpu"])
        generator.set_state(rng["data"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
        return int(state["iter_num"])
    except torch.cuda.OutOfMemoryError:
        raise  # the OOM path reports it
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise _unreadable(path, f"does not fit this run ({type(e).__name__})") from None
