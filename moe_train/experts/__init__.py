"""The expert bank: stacked weights [E_local, ...] of this rank's experts, run on contiguous
per-expert segments by a grouped matmul or a loop (grouped.py)."""

from .bank import ACTIVATIONS, ExpertBank, dense_ffn_params
from .grouped import activate

__all__ = ["ACTIVATIONS", "ExpertBank", "activate", "dense_ffn_params"]
