"""Snapshots for init_from=resume: model and optimizer state (full, unsharded), the step and
every rank's RNG state (each rank has its own data stream and dropout masks), in one file
read back with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import torch

from . import distributed
from .distributed import DistInfo
from .files import atomic_path


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
        torch.save(state, tmp)


def load_snapshot(path: Path, model, optimizer, generator: torch.Generator, device: torch.device,
                  dist: DistInfo) -> int:
    """Restore the state save_snapshot wrote; returns the step to resume from."""
    if not path.is_file():
        raise ValueError(f"init_from=resume but {path} does not exist; train with "
                         f"--save_snapshot true first or use --init_from scratch")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if len(state["rng"]) != dist.world_size:
        raise ValueError(f"{path} was written by {len(state['rng'])} process(es), "
                         f"this run has {dist.world_size}; resume with the same number "
                         f"(torchrun --nproc_per_node) or use --init_from scratch")
    distributed.load_full_state_dicts(model, optimizer, state["model"], state["optimizer"])
    rng = state["rng"][dist.rank]
    torch.set_rng_state(rng["cpu"])
    generator.set_state(rng["data"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    return state["iter_num"]
