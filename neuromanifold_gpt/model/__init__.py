from .block import NeuroManifoldBlock
from .gpt import NeuroManifoldGPT

__all__ = ["NeuroManifoldBlock", "NeuroManifoldGPT"]
