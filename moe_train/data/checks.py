"""What training checks of its data before the first step, so bad data fails at start naming the
file: the vocabulary (and the model's size from it), every token id, and the split sizes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .tokens import DataError, TokenFile

VOCAB_MULTIPLE = 64  # a vocabulary left to the data is padded to a multiple of this


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def _where(data: Any) -> str:
    return str(data.path.with_suffix(".json")) if isinstance(data, TokenFile) else str(data.path)


def resolve_vocab_size(model_vocab: int | None, data: Any) -> int:
    """model.vocab_size: the data's vocabulary (`data.vocab_size`: a TokenFile or a Source)
    rounded up to a multiple of 64 when null; an explicit value smaller than the data's is an
    error naming both."""
    if model_vocab is None:
        return round_up(data.vocab_size)
    if model_vocab < data.vocab_size:
        raise DataError(
            f"model.vocab_size={model_vocab} is smaller than the data's vocabulary "
            f"({data.vocab_size}, {_where(data)}); raise model.vocab_size or "
            "leave it null (= the data's, rounded up to a multiple of 64)"
        )
    return model_vocab


def check_token_ids(files: Iterable[Any], vocab_size: int) -> None:
    """Every id < vocab_size, for TokenFiles (their max_token) or Sources (their largest_ids):
    from metadata, or one vectorised pass over files without it (nanoGPT folders, older
    sidecars, Megatron files). The error names the file and both numbers."""
    for data in files:
        found = (
            [(str(data.path), data.max_token)]
            if isinstance(data, TokenFile)
            else data.largest_ids()
        )
        for where, top in found:
            if top >= vocab_size:
                raise DataError(
                    f"token file {where}: its largest token id is {top}, outside "
                    f"model.vocab_size={vocab_size}; set model.vocab_size to at least "
                    f"{top + 1} or re-create the data with `moe-train-prepare`"
                )


def check_split_sizes(
    train: Any, val: Any | None, seq_len: int, global_batch: int, source: str = ""
) -> None:
    """train holds one window of seq_len + 1 tokens; val (when evaluated) one batch of
    global_batch windows. Either is a TokenFile or a TokenStream. Raises DataError naming the
    file (and the mixture source), its count and the fix."""
    of = f" (data.mix source {source!r})" if source else ""
    if len(train) < seq_len + 1:
        raise DataError(
            f"token file {_name(train)}{of} has {len(train)} tokens, fewer than model.seq_len + 1"
            f" = {seq_len + 1} needed for one training window; use more data or a smaller "
            "model.seq_len"
        )
    if val is not None and (len(val) - 1) // seq_len < global_batch:
        need = global_batch * seq_len + 1
        raise DataError(
            f"token file {_name(val)}{of} has {len(val)} tokens, fewer than the {need} of one "
            f"validation batch (trainer.global_batch_size={global_batch} windows of "
            f"model.seq_len={seq_len}); give validation more text (moe-train-prepare "
            "--val-fraction, e.g. 0.1; data.holdout for Megatron files), lower "
            "trainer.global_batch_size or model.seq_len, or set trainer.eval_batches=0 to train "
            "without validation"
        )


def _name(tokens: Any) -> str:
    return str(tokens.path) if isinstance(tokens, TokenFile) else tokens.name
