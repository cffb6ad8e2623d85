"""NeuroManifold GPT: GPT training with measured activation checkpointing."""

from .checkpointing import apply_activation_checkpointing
from .config.base import ActivationCheckpoint, NeuroManifoldConfig, TrainConfig
from .model import NeuroManifoldBlock, NeuroManifoldGPT


def build_model(config: NeuroManifoldConfig,
                checkpoint: ActivationCheckpoint | None = None) -> NeuroManifoldGPT:
    """The model, checkpointed as `checkpoint` says when config.gradient_checkpointing is on
    (the default policy: block). A run applies checkpointing with compile and its parallelism
    in one place instead (distributed.parallelize)."""
    model = NeuroManifoldGPT(config)
    apply_activation_checkpointing(model, checkpoint or ActivationCheckpoint())
    return model


__all__ = ["NeuroManifoldConfig", "TrainConfig", "NeuroManifoldGPT", "NeuroManifoldBlock",
           "apply_activation_checkpointing", "build_model"]
