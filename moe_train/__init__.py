"""moe-train: PyTorch-native training of sparse Mixture-of-Experts language models."""

from .inference.export import from_pretrained
from .inference.generate import generate
from .layer import MoELayer
from .model import ModelConfig, MoETransformer
from .routing import Assignment, RouterConfig, build_router

__all__ = [
    "Assignment",
    "MoELayer",
    "ModelConfig",
    "MoETransformer",
    "RouterConfig",
    "build_router",
    "from_pretrained",
    "generate",
]
__version__ = "0.1.0"
