"""What training checks of its data before the first step, so a bad folder fails at start naming
the file: the vocabulary (and the model's size from it), every token id, and the split sizes."""

from __future__ import annotations

from .tokens import DataError, TokenFile

VOCAB_MULTIPLE = 64  # a vocabulary left to the data is padded to a multiple of this


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def resolve_vocab_size(model_vocab: int | None, data: TokenFile) -> int:
    """model.vocab_size: the data's vocabulary rounded up to a multiple of 64 when null; an
    explicit value smaller than the data's is an error naming both."""
    if model_vocab is None:
        return round_up(data.vocab_size)
    if model_vocab < data.vocab_size:
        raise DataError(
            f"model.vocab_size={model_vocab} is smaller than the data's vocabulary "
            f"({data.vocab_size}, {data.path.with_suffix('.json')}); raise model.vocab_size or "
            "leave it null (= the data's, rounded up to a multiple of 64)"
        )
    return model_vocab


def check_token_ids(files: list[TokenFile], vocab_size: int) -> None:
    """Every id < vocab_size: from the sidecar's max_token, or one vectorised pass over files
    without it (nanoGPT folders, older sidecars). The error names the file and both numbers."""
    for tf in files:
        if tf.max_token >= vocab_size:
            raise DataError(
                f"token file {tf.path}: its largest token id is {tf.max_token}, outside "
                f"model.vocab_size={vocab_size}; set model.vocab_size to at least "
                f"{tf.max_token + 1} or re-create the data with `moe-train-prepare`"
            )


def check_split_sizes(
    train: TokenFile, val: TokenFile | None, seq_len: int, global_batch: int
) -> None:
    """train holds one window of seq_len + 1 tokens; val (when evaluated) one batch of
    global_batch windows. Raises DataError naming the file, its count and the fix."""
    if train.num_tokens < seq_len + 1:
        raise DataError(
            f"token file {train.path} has {train.num_tokens} tokens, fewer than model.seq_len + 1"
            f" = {seq_len + 1} needed for one training window; use more data or a smaller "
            "model.seq_len"
        )
    if val is not None and (val.num_tokens - 1) // seq_len < global_batch:
        need = global_batch * seq_len + 1
        raise DataError(
            f"token file {val.path} has {val.num_tokens} tokens, fewer than the {need} of one "
            f"validation batch (trainer.global_batch_size={global_batch} windows of "
            f"model.seq_len={seq_len}); give validation more text (moe-train-prepare "
            "--val-fraction, e.g. 0.1), lower trainer.global_batch_size or model.seq_len, or "
            "set trainer.eval_batches=0 to train without validation"
        )
