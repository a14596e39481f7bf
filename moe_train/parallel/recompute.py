"""Activation checkpointing (trainer.activation_checkpointing), always non-reentrant.

- none: keep every activation.
- moe:  recompute only the MoE layers' expert FFNs (the expert banks): their hidden activations
        (k * tokens * expert_d_ff per layer, the largest activation of an MoE model) are freed;
        the router, the all-to-all and attention keep theirs, so no collective runs again.
- full: recompute each Transformer block in backward from its input (the all-to-alls inside run
        again, in the same order on every rank).

`torch.utils.checkpoint(use_reentrant=False)` only: the reentrant variant silently drops the
gradient of outputs that are not tensors returned positionally (the aux losses).
The module's `forward` is wrapped in place (no wrapper module), so parameter names, and with them
checkpoint keys, do not change; FSDP's hooks stay outside the recomputed region (as with
torch's checkpoint_wrapper applied before fully_shard).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint

from .placement import expert_banks

MODES = ("none", "moe", "full")
_MARK = "_moe_train_checkpointed"


def _recomputed(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def checkpoint_module(module: nn.Module) -> None:
    """Recompute `module`'s forward in backward (idempotent)."""
    if getattr(module, _MARK, False):
        return
    module.forward = _recomputed(module.forward)  # instance attribute: nn.Module.__call__ uses it
    setattr(module, _MARK, True)


def _targets(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    if mode == "full":
        yield from getattr(model, "blocks", [])
    elif mode == "moe":
        yield from expert_banks(model)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap the modules `mode` names (see the module docstring) for recomputation."""
    if mode not in MODES:
        raise ValueError(
            f"trainer.activation_checkpointing: got {mode!r}; allowed: {', '.join(MODES)}"
        )
    for module in _targets(model, mode):
        checkpoint_module(module)
