"""The expert bank: stacked weights [E_local, ...] of this rank's experts, run on contiguous
per-expert segments by a grouped matmul or a loop (grouped.py)."""

from .bank import ACTIVATIONS, ExpertBank, dense_ffn_params
from .grouped import activate
from .shared import SharedExperts, shared_expert_params

__all__ = [
    "ACTIVATIONS",
    "ExpertBank",
    "SharedExperts",
    "activate",
    "dense_ffn_params",
    "shared_expert_params",
]
