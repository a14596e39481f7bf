"""trainer.compile: torch.compile per Transformer block, as torchtitan's apply_compile.

- none:   eager.
- blocks: each block of `model.blocks` compiled in place (`nn.Module.compile`), after activation
          checkpointing and before FSDP / DDP wrap it (parallelize's order), so the state-dict
          keys do not change (no `_orig_mod.`: checkpoints load compiled or not) and FSDP2's and
          DDP's hooks stay outside the compiled graphs. One block's graph is reused by the others
          (same code, same shapes).

The fused ops trace through their fake kernels (torch.library.register_fake); the expert loop runs
as one opaque op (experts.grouped.loop_ffn_op), data-dependent sizes (kept slots) are captured
(dynamo's capture_dynamic_output_shape_ops, set here). At ep = 1 the MoE layer is one graph (no
break: tests/model/test_compile.py). At ep > 1 each all-to-all hop reads
its split sizes on the host (all_to_all_single takes Python ints), so dynamo breaks the graph
there (see docs/RESULTS.md for the count); the pieces between the breaks are still compiled.
The router noise's seed changes every step and differs per layer: as a Python int it would be a
constant to dynamo, guarded, a recompile per step and per layer. So the model mixes each MoE
layer's key on the host, outside the blocks, and hands the block its seed as a 0-d int64 tensor
(`RouteKey.for_compiled_layer`); inside, the seed is hashed with torch ops (ops.hashing: the same
bits as the host hash) and the jitter runs as the torch reference, which inductor fuses. The
token offset (the global index of the call's first token: new every micro-step, different on
every rank) travels as a 0-d int64 tensor too: as an int it was a constant, so a recompile per
rank, and inductor folding `(offset + t) * golden` at compile time overflowed int64 on every
rank but the first (tests/model/test_compile.py counts the graphs; tests/training/
test_cli_parity.py runs compiled blocks on 4 ranks against the eager single process). Compilation happens lazily, at the first forward; the
generator (moe_train.inference) builds its own eager model.
"""

from __future__ import annotations

import torch._dynamo
from torch import nn

COMPILE_MODES = ("none", "blocks")
# dynamo settings the blocks need: data-dependent sizes stay in the graph (unbacked sizes) for
# the compaction of kept slots under capacity and random routing's second choices
DYNAMO_CONFIG = {"capture_dynamic_output_shape_ops": True}


def compile_blocks(model: nn.Module, mode: str) -> None:
    """Compile every block of `model.blocks` in place when mode is 'blocks' (see the module
    docstring); 'none' leaves the model eager."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"trainer.compile: got {mode!r}; allowed: {', '.join(COMPILE_MODES)}")
    if mode == "none":
        return
    for key, value in DYNAMO_CONFIG.items():  # process-wide: read when the blocks are traced
        setattr(torch._dynamo.config, key, value)
    if hasattr(model, "seeds_as_tensors"):  # MoETransformer: layer keys mixed outside the blocks
        setattr(model, "seeds_as_tensors", True)  # noqa: B010 (an nn.Module attribute)
    for block in getattr(model, "blocks", []):
        block.compile()
