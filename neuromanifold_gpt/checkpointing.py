"""Activation checkpointing applied from outside the model (torchtitan style).

`apply_activation_checkpointing` replaces the `forward` of the chosen modules with one that
runs the original under `torch.utils.checkpoint` (non-reentrant, RNG state preserved) while
the model trains, so the activations inside are recomputed in backward instead of kept.
Parameter names and state_dict keys do not change, and DDP, FSDP2 and torch.compile can be
applied afterwards.

Policies:
  block      recompute each whole block (HF's `gradient_checkpointing_enable()`)
  attention  recompute only the attention sub-layer
  mlp        recompute only the MLP sub-layer
  selective  recompute each block's cheap element-wise ops, keep matmul and attention outputs
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from .config.base import ActivationCheckpoint, NeuroManifoldConfig
from .errors import BadInput

# Outputs worth keeping under the selective policy: the matmuls and the attention kernels.
# Everything else (LayerNorm, GELU, adds, dropout, views) is cheap to recompute.
_aten = torch.ops.aten
_SAVE_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx, op, *args, **kwargs):
    # Functional random ops (CUDA's native_dropout, SDPA with dropout) are saved: one recomputed
    # after a saved one would draw from a shifted RNG stream, another mask. In-place ones (CPU
    # dropout's bernoulli_) are recomputed with their whole region from the restored RNG state.
    random = torch.Tag.nondeterministic_seeded in op.tags and not op._schema.is_mutable
    if op in _SAVE_OPS or random:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def _wrap_forward(module: nn.Module, policy: str) -> None:
    if getattr(module, "_checkpoint_policy", None):
        raise BadInput(f"activation checkpointing is already applied to {type(module).__name__}")
    forward = module.forward
    kwargs = dict(use_reentrant=False, preserve_rng_state=True)
    if policy == "selective":
        kwargs["context_fn"] = _selective_context

    @functools.wraps(forward)
    def checkpointed_forward(*args):
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, **kwargs)
        return forward(*args)

    module.forward = checkpointed_forward
    module._checkpoint_policy = policy


def checkpointed_layers(config: NeuroManifoldConfig, ac: ActivationCheckpoint) -> list[int]:
    """Indices of the blocks checkpointed (every k-th, within the first N), when the model
    config's gradient_checkpointing is on."""
    if not config.gradient_checkpointing:
        return []
    last = config.n_layer if ac.checkpoint_layers is None else min(ac.checkpoint_layers, config.n_layer)
    return list(range(0, last, ac.checkpoint_every))


def apply_activation_checkpointing(model: nn.Module, ac: ActivationCheckpoint) -> list[int]:
    """Checkpoint model.transformer.h[i] as `ac` says, when model.config.gradient_checkpointing
    is on; returns the indices wrapped."""
    layers = checkpointed_layers(model.config, ac)
    policy = ac.checkpoint_policy
    for i in layers:
        block = model.transformer.h[i]
        target = {"attention": block.attn, "mlp": block.mlp}.get(policy, block)
        _wrap_forward(target, policy)
    return layers
