"""The optimizer (AdamW, weight decay on 2-D weights only) and the learning-rate schedule
(linear warm-up, then cosine decay to min_lr)."""

from __future__ import annotations

import math

import torch

from .config.base import MemoryLevers, Optimizer
from .levers import OptimizerInBackward


def lr_at(it: int, cfg: Optimizer) -> float:
    """Linear warm-up, then cosine decay to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: Optimizer, levers: MemoryLevers, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    in_backward = levers.optimizer_in_backward
    optimizer = OptimizerInBackward if in_backward else torch.optim.AdamW
    return optimizer(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                     fused=device.type == "cuda")
