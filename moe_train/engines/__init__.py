"""Engines: what applies the update behind the training loop (native, DeepSpeed)."""

from .deepspeed_engine import DeepSpeedEngine, deepspeed_initialize
from .native import NativeEngine
from .protocol import Engine

__all__ = ["DeepSpeedEngine", "Engine", "NativeEngine", "deepspeed_initialize"]
