"""NeuroManifold GPT: GPT training with measured activation checkpointing."""

from .checkpointing import apply_activation_checkpointing
from .config.base import NeuroManifoldConfig, TrainConfig
from .model import NeuroManifoldBlock, NeuroManifoldGPT


def build_model(config: NeuroManifoldConfig) -> NeuroManifoldGPT:
    """The model with activation checkpointing applied as its config asks."""
    model = NeuroManifoldGPT(config)
    apply_activation_checkpointing(model, config)
    return model


__all__ = ["NeuroManifoldConfig", "TrainConfig", "NeuroManifoldGPT", "NeuroManifoldBlock",
           "apply_activation_checkpointing", "build_model"]
