"""The conversion between our tensors and a Hugging Face class's: a list of pieces, computed from
the configs, checked to be a bijection before a single value moves.

Our side of a piece is a `Ref`: a dense tensor (`blocks.0.attn.qkv.weight`) or ONE GLOBAL EXPERT
of a stacked expert tensor (`blocks.1.ffn.experts.w_in`, expert 5: [d, 2f]), and a rectangular
region of it; the HF side is one tensor name, holding that region (transposed for the experts:
we store [in, out], HF stores nn.Linear's [out, in]). A piece without a Ref is a tensor the HF
class needs and we hold as an exact zero (Qwen2-MoE's empty shared expert). A piece may carry a
power-of-two `scale`, exact both ways in binary floating point (an ungated shared expert's
down_proj is 2 w_out behind Qwen2's zero gate: sigmoid(0) = 1/2).

`Conversion.check(shapes)` proves, before anything is read or written, that:
  - every HF name is produced by exactly one piece (no duplicate, so no expert written twice);
  - every one of our tensors (every global expert of every stacked tensor) is covered by its
    pieces exactly once, element by element (regions tile it: no overlap, no gap);
  - no piece names a tensor we do not have.
Export and import both run it, then move values piece by piece; the exporter then reads the
written file back and compares every HF tensor with the region it came from (`compare`), which
catches a missing, extra, duplicated or swapped expert by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor


class ConversionError(ValueError):
    """A conversion that is not a bijection, or tensors that do not fit it; the message names
    the tensor(s)."""


@dataclass(frozen=True)
class Ref:
    """One of our tensors: `name` (a state-dict name), `expert` its global expert for a stacked
    expert tensor ([E, ...], the piece is then in expert `expert`'s slice [...]), else None."""

    name: str
    expert: int | None = None

    def __str__(self) -> str:
        return self.name if self.expert is None else f"{self.name}[expert {self.expert}]"


@dataclass(frozen=True)
class Piece:
    """HF tensor `hf` = our `ref`'s region (one (start, stop) per dim), transposed when
    `transpose` (2-D only), times `scale` (a power of two: exact); `ref` None: an exact zero of
    `zero_shape`."""

    hf: str
    ref: Ref | None
    region: tuple[tuple[int, int], ...] = ()
    transpose: bool = False
    zero_shape: tuple[int, ...] = ()
    scale: float = 1.0

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.ref is None:
            return self.zero_shape
        shape = tuple(b - a for a, b in self.region)
        return shape[::-1] if self.transpose else shape

    def take(self, ours: Tensor) -> Tensor:
        """This piece's HF tensor from our (per-expert) tensor `ours`."""
        t = ours[tuple(slice(a, b) for a, b in self.region)]
        t = t.t() if self.transpose else t
        return t * self.scale if self.scale != 1.0 else t


@dataclass
class Conversion:
    """The pieces of one architecture for one config (arch.py builds them), in HF-name order."""

    arch: str
    pieces: list[Piece] = field(default_factory=list)

    def add(
        self,
        hf: str,
        ref: Ref,
        shape: tuple[int, ...],
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
        transpose: bool = False,
        scale: float = 1.0,
    ) -> None:
        """Piece hf = ours[rows, cols] (`shape`: our per-expert tensor's; None = the whole dim)."""
        if scale <= 0 or math.frexp(scale)[0] != 0.5:
            raise ConversionError(f"{self.arch}: {hf}: scale {scale} is not a power of two")
        region = [(0, n) for n in shape]
        if rows is not None:
            region[0] = rows
        if cols is not None:
            region[1] = cols
        self.pieces.append(Piece(hf, ref, tuple(region), transpose, scale=scale))

    def add_zero(self, hf: str, shape: tuple[int, ...]) -> None:
        self.pieces.append(Piece(hf, None, zero_shape=shape))

    def hf_names(self) -> dict[str, Piece]:
        return {p.hf: p for p in self.pieces}

    def check(self, shapes: Mapping[Ref, tuple[int, ...]]) -> None:
        """Raise ConversionError unless the pieces are a bijection onto `shapes` (every Ref we
        hold, per global expert, and its shape): see the module docstring."""
        seen: dict[str, Piece] = {}
        for p in self.pieces:
            if p.hf in seen:
                raise ConversionError(
                    f"{self.arch}: {p.hf} would be produced twice (from {seen[p.hf].ref} and "
                    f"{p.ref}); a conversion writes every tensor once"
                )
            seen[p.hf] = p
        by_ref: dict[Ref, list[Piece]] = {}
        for p in self.pieces:
            if p.ref is None:
                continue
            if p.ref not in shapes:
                raise ConversionError(f"{self.arch}: {p.hf} maps to {p.ref}, which the model lacks")
            by_ref.setdefault(p.ref, []).append(p)
        for ref, shape in shapes.items():
            _check_tiling(self.arch, ref, tuple(shape), by_ref.get(ref, []))


def _check_tiling(arch: str, ref: Ref, shape: tuple[int, ...], pieces: list[Piece]) -> None:
    """The regions of `pieces` tile `shape` exactly once (each region a box inside it)."""
    if not pieces:
        raise ConversionError(f"{arch}: {ref} {list(shape)} has no Hugging Face tensor")
    total = 0
    for p in pieces:
        if len(p.region) != len(shape) or any(
            not 0 <= a < b <= n for (a, b), n in zip(p.region, shape)
        ):
            raise ConversionError(f"{arch}: {p.hf} takes {p.region} outside {ref} {list(shape)}")
        total += _volume(p.region)
    for i, p in enumerate(pieces):
        for q in pieces[i + 1 :]:
            if all(a < d and c < b for (a, b), (c, d) in zip(p.region, q.region)):
                raise ConversionError(f"{arch}: {p.hf} and {q.hf} overlap in {ref}")
    if total != _volume(tuple((0, n) for n in shape)):
        raise ConversionError(
            f"{arch}: the Hugging Face tensors of {ref} {list(shape)} cover {total} of its "
            f"{_volume(tuple((0, n) for n in shape))} values"
        )


def _volume(region: tuple[tuple[int, int], ...]) -> int:
    n = 1
    for a, b in region:
        n *= b - a
    return n


def compare(
    conv: Conversion,
    ours: Callable[[Ref], Tensor],
    read: Callable[[str], Tensor],
    hf_names: list[str],
    where: str,
) -> None:
    """Every HF tensor of a written folder (`hf_names`, `read(name)`) against the region of ours
    it must hold (`ours(ref)`: our per-expert tensor): names (missing, extra), shapes, values
    (exactly; a zero piece must be zeros). A swapped or duplicated expert fails here by name."""
    expected = conv.hf_names()
    missing = sorted(set(expected) - set(hf_names))
    extra = sorted(set(hf_names) - set(expected))
    if missing or extra:
        raise ConversionError(
            f"{where}: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, extra "
            f"{extra[:5]}{' ...' if len(extra) > 5 else ''} (of {len(expected)} tensors)"
        )
    for name, piece in expected.items():
        got = read(name)
        if tuple(got.shape) != piece.hf_shape:
            raise ConversionError(
                f"{where}: {name} has shape {list(got.shape)}, expected {list(piece.hf_shape)}"
            )
        want = torch.zeros(piece.zero_shape) if piece.ref is None else piece.take(ours(piece.ref))
        if not torch.equal(got.to(want.dtype), want):
            raise ConversionError(
                f"{where}: {name} does not hold {piece.ref or 'zeros'} (values differ: a "
                "swapped, duplicated or mis-sliced tensor)"
            )
