"""BatchPlan: which sequences of every global batch this rank reads (train and validation)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import BatchSampler, TrainingData, val_batches
from ..data.sampler import Tokens


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

    def micro_batches(
        self, data: TrainingData | Tokens, step: int
    ) -> Iterator[tuple[Tensor, Tensor, int]]:
        """(x [micro, T], y [micro, T], token_offset) per micro-batch of step `step`; the offset is
        the global index of x's first token in the step's batch (it keys router noise)."""
        sampler = self.sampler(data)
        for m in range(self.grad_accum):
            first = self.data_rank * self.share + m * self.micro  # first sample of the global batch
            x, y = sampler.batch(step, first, self.micro)
            yield x.to(self.device), y.to(self.device), first * self.seq_len

    def eval_batches(self, tokens: Tokens, max_batches: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's share (x, y: [share, T]) of the fixed validation batches of B windows."""
        first = self.data_rank * self.share
        for x, y in val_batches(
            tokens, self.seq_len, self.global_batch, max_batches, first, self.share
        ):
            yield x.to(self.device), y.to(self.device)
