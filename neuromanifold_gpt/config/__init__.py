from .base import POLICIES, PRESETS, ActivationCheckpoint, MemoryLevers, NeuroManifoldConfig, TrainConfig

__all__ = ["NeuroManifoldConfig", "TrainConfig", "ActivationCheckpoint", "MemoryLevers", "PRESETS",
           "POLICIES"]
