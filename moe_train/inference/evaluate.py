"""`moe-train-eval RUN_DIR`: score a trained run on a token split.

    moe-train-eval runs/switch-d128x4-e8                      # the run's own validation split
    moe-train-eval runs/switch-d128x4-e8 --data data/mine --split val --batches 50 --json
    moe-train-eval runs/mix                                   # a mixture: every source's split

Loss is the mean cross-entropy in nats per token over non-overlapping windows of model.seq_len
from the split's start (the same windows training validates on); perplexity = exp(loss); bits per
token = loss / ln 2; bits per byte = total bits / the UTF-8 bytes the scored tokens stand for (the
tokenizer's token_bytes: 1 per token for bytes; the end-of-document token counts as 1), so runs
with different tokenizers compare. Per MoE layer: each expert's share of the routed slots, its
coefficient of variation, and the fraction of slots dropped by capacity. A run trained on a
mixture (data.mix) is scored on every source's split, and its loss is their mean weighted by the
mixture's weights (what training logs as val_loss).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data import TokenStream, open_data, open_source, val_batches
from ..data.sampler import Tokens, num_val_batches
from ..model import MoETransformer
from .cli import fail, run_arguments


class LoadTally:
    """Slots per expert and the dropped fraction of every MoE layer over the scored batches."""

    def __init__(self, model: MoETransformer):
        self.layers = model.moe_layers()
        self.load = [torch.zeros(layer.num_experts, dtype=torch.float64) for layer in self.layers]
        self.dropped = [0.0] * len(self.layers)  # sum over batches of dropped_frac * tokens
        self.tokens = 0.0

    def add(self, tokens: int) -> None:
        """After a forward of `tokens` tokens: every layer's `last_load` and `last_stats`."""
        for i, layer in enumerate(self.layers):
            if layer.last_load is not None:
                self.load[i] += layer.last_load.double().cpu()
                self.dropped[i] += layer.last_stats["dropped_frac"] * tokens
        self.tokens += tokens

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for i, load in enumerate(self.load):
            share = load / max(1.0, float(load.sum()))
            mean = float(share.mean())
            out.append(
                {
                    "moe_layer": i,
                    "expert_share": [round(float(s), 6) for s in share],
                    "load_cv": float(share.std(unbiased=False)) / mean if mean > 0 else 0.0,
                    "min_share": float(share.min()),
                    "max_share": float(share.max()),
                    "dropped_frac": self.dropped[i] / max(1.0, self.tokens),
                }
            )
        return out


@torch.no_grad()
def score(
    model: MoETransformer,
    tokens: Tokens,
    token_bytes: np.ndarray,
    batch_size: int,
    max_batches: int | None,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> dict[str, Any]:
    """loss, perplexity, bits_per_token, bits_per_byte, tokens, bytes and moe_layers (the load
    summary) over up to max_batches batches of batch_size windows of the split."""
    model.eval()
    device = next(model.parameters()).device
    seq_len = model.cfg.seq_len
    nats, count, nbytes = 0.0, 0, 0
    tally = LoadTally(model)
    byte_table = torch.as_tensor(token_bytes, dtype=torch.int64)
    for x, y in val_batches(tokens, seq_len, batch_size, max_batches):
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits, _ = model(x.to(device))  # [b, T, V]
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum")
        nats += float(ce)
        count += y.numel()
        nbytes += int(byte_table[y.clamp_max(len(byte_table) - 1)].sum())
        tally.add(y.numel())
    loss = nats / count
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_token": loss / math.log(2),
        "bits_per_byte": nats / math.log(2) / max(1, nbytes),
        "tokens": count,
        "bytes": nbytes,
        "moe_layers": tally.summary(),
    }


@dataclass
class Target:
    """One split to score: a source's name, its weight in the mixture, its tokens, its tokenizer."""

    name: str
    weight: float
    path: Path
    tokens: TokenStream
    tokenizer: Any


def _targets(run: Any, data: str | None, split: str) -> list[Target]:
    """The splits to score (`--data`: that source; else every source of the run's data),
    checked against the model's vocabulary."""
    from ..data import DataError
    from ..data.checks import check_token_ids
    from ..data.tokenizers import load_tokenizer

    vocab, cfg = run.cfg.model.vocab_size, run.cfg.data
    if data:
        sources, weights = [open_source(data, vocab, cfg.holdout)], [1.0]
    else:
        opened = open_data(cfg, vocab)
        sources, weights = opened.sources, opened.weights
    check_token_ids(sources, vocab)
    out = []
    for s, w in zip(sources, weights):
        tokens = s.val if split == "val" else s.train
        if tokens is None:
            continue  # a Megatron source with data.holdout=0
        tok = run.tokenizer
        if data and s.tokenizer != "unknown":
            tok = load_tokenizer(s.tokenizer_folder, s.tokenizer)
        out.append(Target(s.name, w, s.path, tokens, tok))
    if not out:
        raise DataError(f"no {split} split in {', '.join(str(s.path) for s in sources)}")
    return out


def _print_report(run_dir: str, targets: list[Target], split: str, r: dict[str, Any]) -> None:
    parts = r.get("sources", {targets[0].name: r})
    for t in targets:
        p = parts[t.name]
        print(
            f"{run_dir} on {t.path} ({split}, {p['tokens']:,} tokens, {p['bytes']:,} bytes): "
            f"loss {p['loss']:.4f}, perplexity {p['perplexity']:.3f}, "
            f"{p['bits_per_token']:.4f} bits/token, {p['bits_per_byte']:.4f} bits/byte"
        )
        for layer in p["moe_layers"]:
            shares = " ".join(f"{s:.3f}" for s in layer["expert_share"])
            print(
                f"  MoE layer {layer['moe_layer']}: load cv {layer['load_cv']:.3f}, share min "
                f"{layer['min_share']:.3f} max {layer['max_share']:.3f}, dropped "
                f"{layer['dropped_frac']:.2%}; per expert {shares}"
            )
    if "sources" in r:
        print(
            f"mixture ({', '.join(f'{t.name} {w:.3g}' for t, w in zip(targets, r['weights']))}): "
            f"loss {r['loss']:.4f}, perplexity {r['perplexity']:.3f}, "
            f"{r['bits_per_token']:.4f} bits/token"
        )


def _mixture(parts: dict[str, dict[str, Any]], targets: list[Target]) -> dict[str, Any]:
    """The weighted mean loss over the sources (what training logs as val_loss)."""
    total = sum(t.weight for t in targets)
    weights = [t.weight / total for t in targets]
    loss = sum(w * parts[t.name]["loss"] for t, w in zip(targets, weights))
    return {
        "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_token": loss / math.log(2), "weights": weights, "sources": parts,
    }  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-train-eval",
        description="Loss, perplexity, bits per token and per byte, and expert load per MoE "
        "layer of a run's newest checkpoint on a token split (default: the run's validation data).",
        parents=[run_arguments()],
    )
    p.add_argument(
        "--data", metavar="PATH",
        help="a data folder or Megatron prefix (default: the run's data, every source of a mix)",
    )  # fmt: skip
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument(
        "--batches", type=int, default=None, metavar="N",
        help="score at most N batches (default: the whole split)",
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=int, default=8, metavar="B", help="windows per batch (default 8)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from ..data import DataError
    from .run import RunError, autocast_for, load_run

    args = build_parser().parse_args(argv)
    if (args.batches is not None and args.batches < 1) or args.batch_size < 1:
        build_parser().error("--batches and --batch-size must be >= 1")
    try:
        run = load_run(args.run_dir, args.device, args.checkpoint)
        targets = _targets(run, args.data, args.split)
        device = next(run.model.parameters()).device
        parts = {}
        for t in targets:
            num_val_batches(t.tokens, run.cfg.model.seq_len, args.batch_size)  # one batch at least
            parts[t.name] = score(
                run.model, t.tokens, t.tokenizer.token_bytes(), args.batch_size, args.batches,
                lambda: autocast_for(device),
            )  # fmt: skip
    except (RunError, DataError, ValueError) as e:
        return fail("moe-train-eval", e)
    result = parts[targets[0].name] if len(targets) == 1 else _mixture(parts, targets)
    data_path = str(targets[0].path) if len(targets) == 1 else [str(t.path) for t in targets]
    result.update({"split": args.split, "data": data_path, "step": run.step})
    if args.json:
        print(json.dumps(result))
    else:
        _print_report(args.run_dir, targets, args.split, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
