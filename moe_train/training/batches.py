"""BatchPlan: which sequences of every global batch this rank reads (train and validation)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..data import BatchSampler, TrainingData, val_batches
from ..data.sampler import Tokens, val_positions


class MicroBatch(NamedTuple):
    """One micro-batch of this rank: x, y [micro, T] int64; token_offset, the global index of x's
    first token in the step's batch (it keys router noise); positions [micro, T] int64 inside
    each document (data.document_mask) or None (one causal sequence per row: also with
    data.document_mask when no row holds a document start after its first token, so that such a
    micro-batch takes the unmasked attention, which gives the same logits faster)."""

    x: Tensor
    y: Tensor
    token_offset: int
    positions: Tensor | None


@dataclass(frozen=True)
class BatchPlan:
    """A step's global batch is `global_batch` sequences of `seq_len` tokens (T). Each of the
    `data_world` ranks takes the contiguous share `micro * grad_accum` starting at
    `data_rank * share`, as `grad_accum` micro-batches of `micro` sequences. Pure functions of
    (seed, step): the batches do not depend on the layout and a resumed run sees the same ones."""

    seed: int
    global_batch: int  # B sequences per step, over all ranks
    seq_len: int  # T
    micro: int  # sequences per micro-batch on this rank
    grad_accum: int  # micro-batches per step on this rank
    data_rank: int
    data_world: int
    device: torch.device
    document_mask: bool = False  # batches carry document positions (data.document_mask)

    @property
    def share(self) -> int:
        """Sequences per step on this rank (B / data_world)."""
        return self.micro * self.grad_accum

    def sampler(self, data: TrainingData | Tokens) -> BatchSampler:
        """The global batches of `data`: its sources and sampling (a bare token file or array:
        one source, windows sampling)."""
        if isinstance(data, TrainingData):
            return data.sampler(self.seed, self.global_batch, self.seq_len)
        from ..data.streams import TokenStream

        return BatchSampler(
            [TokenStream.of(data)], [1.0], self.seed, self.global_batch, self.seq_len
        )

    def micro_batches(self, data: TrainingData | Tokens, step: int) -> Iterator[MicroBatch]:
        """The MicroBatch (x, y, token_offset, positions) of each micro-batch of step `step`."""
        sampler = self.sampler(data)
        for m in range(self.grad_accum):
            first = self.data_rank * self.share + m * self.micro  # first sample of the global batch
            x, y = sampler.batch(step, first, self.micro)
            pos = sampler.positions(step, first, self.micro) if self.document_mask else None
            yield MicroBatch(
                x.to(self.device), y.to(self.device), first * self.seq_len, self._to_device(pos)
            )

    def eval_batches(
        self, tokens: Tokens, max_batches: int
    ) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """This rank's share (x, y, positions: [share, T]; positions None without a document
        mask) of the fixed validation batches of B windows."""
        first = self.data_rank * self.share
        args = (tokens, self.seq_len, self.global_batch, max_batches, first, self.share)
        pos = val_positions(*args) if self.document_mask else None
        for x, y in val_batches(*args):
            p = next(pos) if pos is not None else None
            yield x.to(self.device), y.to(self.device), self._to_device(p)

    def _to_device(self, positions: Tensor | None) -> Tensor | None:
        """positions [b, T] on the device; None when every row is one document piece (checked
        on the host, before the copy: no device sync)."""
        if positions is None or not bool((positions[:, 1:] == 0).any()):
            return None
        return positions.to(self.device)
