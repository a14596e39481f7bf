"""moe-train: PyTorch-native training of sparse Mixture-of-Experts language models."""

from .inference.export import from_pretrained
from .inference.generate import generate
from .layer import MoELayer
from .model import ModelConfig, MoETransformer
from .routing import Assignment, RouteKey, RouterConfig, build_router

__all__ = [
    "Assignment",
    "MoELayer",
    "ModelConfig",
    "MoETransformer",
    "RouteKey",
    "RouterConfig",
    "build_router",
    "from_pretrained",
    "generate",
]
__version__ = "0.1.0"
