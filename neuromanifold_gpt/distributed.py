"""Data-parallel training through torchrun: DDP by default, FSDP2 (`fully_shard`) with --fsdp.

    torchrun --standalone --nproc_per_node=N train.py --config config/train_gpt2.py [--fsdp true]

torchrun gives each process RANK, LOCAL_RANK and WORLD_SIZE; `init` reads them and joins the
process group (NCCL on CUDA, gloo on CPU) with a timeout, so a rank that dies or hangs makes
the others fail instead of waiting forever. Started without torchrun, the run is a plain
single process and nothing here wraps anything.

`parallelize` applies a run's plan (neuromanifold_gpt/planner.py) in torchtitan's order:
activation checkpointing, then torch.compile, then FSDP2 per block and on the root (or DDP
around the whole model). The state-dict helpers
give full, unsharded state dicts with the model's own parameter names, so a snapshot is the
same file whatever wrote it."""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from .checkpointing import apply_activation_checkpointing
from .config.base import TrainConfig
from .errors import BadInput
from .loss import LinearCrossEntropyLoss

if TYPE_CHECKING:
    from .planner import Plan

_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the run."""

    rank: int = 0  # global rank; rank 0 prints and writes the files
    local_rank: int = 0  # rank on this node; picks the GPU
    world_size: int = 1  # processes in the run
    parallelism: str = "none"  # none (plain process) | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: torch.device, cfg: TrainConfig) -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group when launched by it; returns this rank's info and device."""
    if not all(k in os.environ for k in _LAUNCHER_ENV):
        if cfg.parallelism.fsdp:
            raise BadInput("fsdp=true needs a torchrun launch: torchrun --standalone "
                             "--nproc_per_node=N train.py ... --fsdp true")
        return DistInfo(), device
    rank, local_rank, world_size = (int(os.environ[k]) for k in _LAUNCHER_ENV)
    cfg.check_rules(world_size)
    if device.type == "cuda":
        if device.index is not None:
            raise BadInput(f"device={device} under torchrun: each rank uses cuda:LOCAL_RANK; use "
                             f"--device cuda and choose GPUs with CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=cfg.parallelism.dist_timeout),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, local_rank, world_size, "fsdp" if cfg.parallelism.fsdp else "ddp"), device


def close() -> None:
    """Leave the process group once every rank is past its last collective.

    The caller drops its DDP wrapper first. DDP's C++ reducer holds the gloo group; a group
    freed from there, GIL held, joins worker threads that may be waiting for the GIL to free a
    finished collective's tensors: a deadlock. Collected here, the reducer lets go while the
    group is still registered, and destroy_process_group frees it from Python without the GIL."""
    gc.collect()  # the wrapped model sits in reference cycles (checkpointed forwards)
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, plan: Plan) -> nn.Module:
    """Apply the plan to a freshly built model, in torchtitan's order: activation checkpointing,
    the lean loss, torch.compile (the whole model, or each block and the loss region alone;
    replayed as CUDA graphs where the plan says), then FSDP2 per block and on the root or DDP
    around the whole model. Returns the module to train through: the DDP wrapper, or the model
    itself (FSDP2 shards it in place)."""
    apply_activation_checkpointing(model, plan.checkpoint)
    if plan.levers.lean_loss:
        model.lean_loss = LinearCrossEntropyLoss(plan.levers.loss_chunk_tokens, plan.levers.loss_kernel)
    blocks = model.transformer.h
    mode = "reduce-overhead" if plan.cuda_graphs else None
    if plan.compile and plan.compile_unit == "block":
        # between FSDP2's hooks, which gather and free each block's parameters at its boundary
        # (torchtitan's way), and around the lean loss's Python loop
        for block in blocks:
            block.compile(mode=mode)
        model.loss = torch.compile(model.loss, mode=mode)
    elif plan.compile:
        model.compile(mode=mode)  # one graph, the plain loss inside it: no fp32 logits
    info, device = plan.dist, plan.device
    if info.parallelism == "ddp":
        # gradients live in DDP's all-reduce buckets instead of beside them: no second copy
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                   gradient_as_bucket_view=True)
    if info.parallelism == "fsdp":
        mesh = init_device_mesh(device.type, (info.world_size,))
        for i, block in enumerate(blocks):
            # backward needs the last block's parameters right after forward: keep them gathered
            fully_shard(block, mesh=mesh, reshard_after_forward=i < len(blocks) - 1)
        fully_shard(model, mesh=mesh)  # the rest: embeddings (tied to the head) and ln_f
    return model


def sync_gradients(model: nn.Module, sync: bool):
    """Context for one micro-step's forward and backward. DDP all-reduces gradients only on
    the last micro-step (`no_sync` before it); FSDP2 reduce-scatters on every micro-step so
    that only sharded gradients are ever kept."""
    if isinstance(model, DDP) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (gloo has no AVG: sum, then divide)."""
    if not dist.is_initialized():
        return float(value)
    total = value.detach().float().reshape(1).clone()
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


def first_failure(error: BaseException | None, device: torch.device) -> str | None:
    """Every rank's answer to "did any rank fail here?": the first failing rank's message, or
    None. All ranks must call it at the same point; one all_reduce of a flag when none failed."""
    if not dist.is_initialized():
        return None if error is None else str(error)
    flag = torch.tensor([error is not None], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return None
    return next(m for m in gather(None if error is None else str(error)) if m is not None)


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on the CPU, keyed by parameter name; every rank
    must call it (FSDP2 gathers the shards), rank 0 receives the tensors."""
    return get_state_dict(model, optimizer,
                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                          optimizer_state: dict) -> None:
    """Load full_state_dicts' output; under FSDP2 each rank keeps its own shard."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
