"""The LM: ModelConfig (config.py), the body's parameter holders and norms (params.py), RoPE
(rope.py), attention and the KV cache (attention.py), blocks and MoETransformer (transformer.py)."""

from .attention import Attention, KVCache, LayerKV
from .config import LEGACY_BODY, LEGACY_OVERRIDES, ModelConfig, with_legacy_body
from .params import Embedding, LayerNorm, Linear, RMSNorm, build_norm
from .rope import RotaryEmbedding, apply_rope, rope_tables
from .transformer import Block, DenseFFN, MoETransformer

__all__ = [
    "LEGACY_BODY",
    "LEGACY_OVERRIDES",
    "Attention",
    "Block",
    "DenseFFN",
    "Embedding",
    "KVCache",
    "LayerKV",
    "LayerNorm",
    "Linear",
    "ModelConfig",
    "MoETransformer",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rope",
    "build_norm",
    "rope_tables",
    "with_legacy_body",
]
