from .base import POLICIES, PRESETS, NeuroManifoldConfig, TrainConfig

__all__ = ["NeuroManifoldConfig", "TrainConfig", "PRESETS", "POLICIES"]
