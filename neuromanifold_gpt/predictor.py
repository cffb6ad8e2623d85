"""Peak training memory predicted from the config, before anything is allocated
(neuromanifold_gpt/planner.py turns it into batch sizes and plans).

The model follows one optimizer step through its phases and takes the largest total:

  loss      end of forward: every layer's kept activations, plus the loss's working set
  backward  block i's backward (top to bottom): the layers below i still keep their
            activations, i's own are all alive (recomputed if checkpointed) with the
            gradient temporaries, the gradients of the layers above exist
  optimizer all gradients and AdamW states

Sizes are in bytes per token x width (N*C, N = batch x block) for activations, per
parameter for weights, per token x vocabulary (N*V) for the plain loss. Under FSDP2 each
rank keeps its shard of the weights, gradients and AdamW states (16/world_size bytes per
parameter) plus the unsharded parameters in flight: the root's (embedding, head, final
LayerNorm) for the whole step and two blocks' (the one running and the one prefetched). The per-layer
coefficients are counted from what autograd saves for each op (eager) and from what
torch.compile's partitioner saves (compiled), see `_kept_per_layer`; tests check the eager
ones against a tensor-by-tensor count on the CPU, the bench checks the whole against
torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .loss import chunk_tokens
from .memory import GIB

if TYPE_CHECKING:
    from .planner import Plan

FP32 = 4  # master weights, gradients, AdamW states, the residual stream and LayerNorm outputs
# Allocated by CUDA libraries through the caching allocator once the first step has run
# (cuBLAS/cuBLASLt workspaces and the like), whatever the model size: the bench's measured
# peaks set it.
CUDA_WORKSPACE = 72 * 2**20


@dataclass
class MemoryPrediction:
    peak_gb: float  # the predicted peak of allocated memory
    phase: str  # where in the step the peak falls
    breakdown: dict[str, float]  # GiB by kind at the peak, summing to peak_gb
    kept_per_layer_gb: float  # activations a layer keeps from forward to backward (mean)
    batch_size: int
    block_size: int
    phases: dict[str, float] = field(default_factory=dict)  # every phase's total, GiB

    def lines(self) -> list[str]:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.breakdown.items() if v >= 0.005)
        return [f"predicted peak memory: {self.peak_gb:.2f} GiB at {self.phase} ({parts}; "
                f"activations kept per layer {self.kept_per_layer_gb * 1024:.0f} MiB)"]


def _kept_per_layer(policy: str, compiled: bool, a: int, dropout: bool) -> float:
    """Bytes per N*C a block keeps for backward: the block input x and second residual x2
    (fp32), and in the compute dtype (a bytes) the LayerNorm outputs cast for the matmuls,
    q/k/v, the attention output, the MLP hidden h (4C) and GELU(h) (4C)."""
    f = FP32
    mask = 1 if dropout else 0  # a bool mask per element for each resid dropout (eager)
    if compiled:
        # what compile's min-cut partitioner keeps: eager's tensors less the weight casts,
        # which it recomputes, and the dropout masks, which it regenerates from the seed
        return {"none": 2 * f + 14 * a, "block": f, "attention": 2 * f + 8 * a,
                "mlp": 2 * f + 5 * a, "selective": f + 10 * a}[policy]
    return {
        "none": 2 * f + 14 * a + 2 * mask,  # x, ln_1 out, qkv, attn out, x2, ln_2 out, h, gelu(h)
        "block": f,  # the block input only
        "attention": 3 * f + 9 * a + mask,  # x, attention input, x2, ln_2 out, h, gelu(h)
        "mlp": 3 * f + 5 * a + mask,  # x, ln_1 out, qkv, attn out, x2, MLP input
        "selective": f + 8 * a + 2 * (a + mask),  # x, qkv, attention output, h (and dropout)
    }[policy]


def _weight_copies(policy: str, compiled: bool, a: int) -> int:
    """Parameters per C^2 whose compute-dtype copies a block keeps until its backward: eager
    autocast keeps the casts of the matmul weights that run outside a checkpoint."""
    if a == FP32 or compiled:
        return 0
    return {"none": 12, "attention": 8, "mlp": 4, "block": 0, "selective": 0}[policy]


def param_shapes(mc) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """The shapes of one block's parameters and of the root's (embeddings/head, ln_f)."""
    C, bias = mc.n_embd, mc.bias
    layer = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C), (C,), (C,)]  # matmuls, LayerNorms
    if bias:
        layer += [(3 * C,), (C,), (4 * C,), (C,), (C,), (C,)]
    root = [(mc.padded_vocab_size, C), (mc.block_size, C), (C,)] + ([(C,)] if bias else [])
    return layer, root


def shard_numel(shapes: list[tuple[int, ...]], world_size: int) -> int:
    """Elements of rank 0's FSDP2 shards: each tensor is split along dim 0 into world_size
    chunks of ceil(dim0 / world_size) rows (the last ones shorter), and rank 0 has a full one."""
    return sum(-(-s[0] // world_size) * math.prod(s[1:]) for s in shapes)


def predict(plan: Plan, batch_size: int | None = None) -> MemoryPrediction:
    """Predicted peak allocated memory of one training step of `plan` on one rank (batch_size
    overrides the plan's, for the batch-size search)."""
    B, T = batch_size or plan.batch_size, plan.block_size
    mc, dtype, device_type = plan.model, plan.dtype, plan.device.type
    world_size = plan.dist.world_size
    L, C, H, V = mc.n_layer, mc.n_embd, mc.n_head, mc.padded_vocab_size
    N = B * T
    NC = N * C
    a = FP32 if dtype == torch.float32 else 2  # compute dtype (autocast) bytes
    f = FP32
    dropout = mc.dropout > 0
    compiled = plan.compile

    layer_shapes, root_shapes = param_shapes(mc)
    n_layer_params = sum(math.prod(s) for s in layer_shapes)
    n_root_params = sum(math.prod(s) for s in root_shapes)
    n_params = L * n_layer_params + n_root_params
    fsdp = plan.dist.parallelism == "fsdp" and world_size > 1
    # a rank's share of the weights: all of them, or its FSDP2 shard of each
    held = (L * shard_numel(layer_shapes, world_size) + shard_numel(root_shapes, world_size)
            if fsdp else n_params)
    params, adamw = FP32 * held, 2 * FP32 * held
    # FSDP2 keeps the root unsharded through the step and gathers two blocks at a time
    in_flight = FP32 * (n_root_params + 2 * n_layer_params) if fsdp else 0
    layer_grads = FP32 * n_layer_params  # unsharded until its reduce-scatter under FSDP2
    head_grad = FP32 * V * C  # the tied embedding/head gradient lives from loss to the end
    small = 4 * N * H + 16 * N  # attention log-sum-exp, LayerNorm mean and rstd

    ckpt = set(plan.layers)
    policy = plan.checkpoint.checkpoint_policy
    full = _kept_per_layer("none", compiled, a, dropout) * NC + small \
        + _weight_copies("none", compiled, a) * C * C * a
    kept = []
    for i in range(L):
        p = policy if i in ckpt else "none"
        kept.append(_kept_per_layer(p, compiled, a, dropout) * NC + small
                    + _weight_copies(p, compiled, a) * C * C * a)
    levers = plan.levers
    offload = levers.offload_activations
    if levers.activation_memory_budget < 1.0 and compiled:
        # the partitioner keeps min + budget * (default - min), min = the block's input
        b = levers.activation_memory_budget
        kept = [f * NC + b * (k - f * NC) for k in kept]
        full = f * NC + b * (full - f * NC)
    stem = f * NC + 8 * N + (N * C if dropout else 0)  # ln_f input, token ids, embedding mask
    if offload:  # every saved tensor waits in host memory; one block's comes back at a time
        kept_dev, stem_dev = [0.0] * L, 0.0
    else:
        kept_dev, stem_dev = kept, stem
    # eager autocast caches the compute-dtype casts of the weights for the whole forward;
    # the layers that keep theirs for backward count them in `kept` already
    casts = 0 if (compiled or a == FP32) else a * C * C * sum(
        12 - _weight_copies(policy if i in ckpt else "none", compiled, a) for i in range(L))

    # the loss: plain eager keeps the (N, V) fp32 log-softmax, its backward needs three of
    # those; compiled, it keeps the logits in the compute dtype, and its backward writes their
    # gradient over them (1.0 x aNV, not 2). The lean loss holds one
    # chunk's logits and the two gradients it computed. On CUDA its compiled chunk arithmetic
    # writes the logits' gradient over them, and cuBLAS adds the head's gradient in place; on
    # the CPU the eager chunk holds an fp32 copy, and the head's product exists before its sum.
    w_copy = 0 if a == FP32 else a * V * C  # the head's cast, saved for its backward
    if levers.lean_loss:
        c = min(levers.loss_chunk_tokens or chunk_tokens(N, V), N)
        if device_type == "cuda":
            chunk_work = a * c * V
        else:
            chunk_work = max((a + 8) * c * V, a * c * V + a * V * C)
        loss_fwd = w_copy + head_grad + f * NC + chunk_work
        loss_bwd = head_grad + f * NC
    elif compiled:
        loss_fwd = loss_bwd = a * N * V + a * NC + w_copy
    else:
        loss_fwd = (a + 8) * N * V + a * NC + w_copy
        loss_bwd = 12 * N * V + a * NC + w_copy

    # gradient temporaries at the worst moment of a block's backward (the MLP output
    # projection's): the incoming gradient (fp32), its cast to the compute dtype, the
    # gradient of GELU(h) (4C); and the layer's weight gradients
    bwd_tmp = (f + 4 * a + (a if a < f else 0)) * NC + layer_grads

    phases: dict[str, dict[str, float]] = {}
    other = CUDA_WORKSPACE if device_type == "cuda" else 0
    params_live = params + in_flight  # through forward and backward; all resharded after
    # during the loss the final LayerNorm's output (the loss input, fp32) exists too
    phases["loss"] = dict(params=params_live, optimizer=adamw, activations=sum(kept_dev) + stem_dev,
                          working=0.0, loss=loss_fwd + casts + f * NC, grads=0.0, other=other)
    phases["backward start"] = dict(params=params_live, optimizer=adamw,
                                    activations=sum(kept_dev) + stem_dev, working=0.0,
                                    loss=loss_bwd, grads=0.0, other=other)
    in_backward = levers.optimizer_in_backward
    for i in reversed(range(L)):
        above = 0 if in_backward else layer_grads * (L - 1 - i)
        # a checkpointed layer rebuilds its full activations; others have kept them
        own = full if i in ckpt else kept[i]
        phases[f"backward of block {i}"] = dict(
            params=params_live, optimizer=adamw, activations=sum(kept_dev[:i]) + stem_dev,
            working=own + bwd_tmp, loss=0.0, grads=head_grad + above, other=other)
    phases["optimizer step"] = dict(params=params, optimizer=adamw, activations=0.0,
                                    working=0.0, loss=0.0,
                                    grads=0.0 if in_backward else FP32 * held, other=other)
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak_phase = max(totals, key=totals.get)
    breakdown = {k: v / GIB for k, v in phases[peak_phase].items()}
    return MemoryPrediction(peak_gb=totals[peak_phase] / GIB, phase=peak_phase,
                            breakdown=breakdown, kept_per_layer_gb=sum(kept) / L / GIB,
                            batch_size=B, block_size=T,
                            phases={k: v / GIB for k, v in totals.items()})


def device_memory_gb(device: torch.device) -> tuple[float, float]:
    """(free, total) GiB: the CUDA device's, or the host's available and total RAM."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free / GIB, total / GIB
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f}
        return info["MemAvailable"] / 1024**2, info["MemTotal"] / 1024**2
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        return total, total
