"""`moe-train-generate RUN_DIR --prompt TEXT`: sample a continuation from a trained run.

    moe-train-generate runs/switch-d128x4-e8 --prompt "def main(" --max-new-tokens 200

Decoding keeps a KV cache (the attention keys and values of every position so far), so each new
token costs one position's compute and the whole generation is linear in its length. Routing while
decoding: in eval mode, so with router.eval_capacity_factor (null, the default: dropless, no
jitter, no random routing); the prompt goes through the model in one pass, every new token is then
routed on its own, and the cached steps give the full forward's logits. For a
router that is not causal (expert choice: experts choose among all tokens of a group, future ones
included) the cache cannot reproduce the routing, and the window is recomputed for every token.
When the sequence reaches model.seq_len, the last 3/4 of the window is re-encoded and decoding goes
on from position 0 (learned positions and the RoPE tables hold model.seq_len positions).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from ..model import KVCache, MoETransformer
from ..routing import router_class
from .cli import fail, run_arguments


def sample_next(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
    vocab_limit: int | None = None,
) -> Tensor:
    """logits [B, V] -> next ids [B]. temperature 0 = greedy; top_k keeps the k most likely;
    ids >= vocab_limit (the padding rows of a padded vocabulary) are never drawn."""
    logits = logits.float().clone()  # [B, V], edited below
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = -float("inf")
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).to(logits.device)


def uses_cache(model: MoETransformer) -> bool:
    """Whether incremental decoding routes as the full forward does (a causal router)."""
    return router_class(model.router_cfg.kind).causal


@torch.no_grad()
def generate(
    model: MoETransformer,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
    stop_token: int | None = None,
    use_cache: bool | None = None,
) -> Tensor:
    """idx: [B, T0] prompt ids -> [B, T0 + n], n <= max_new_tokens (fewer when every sequence
    drew `stop_token`). use_cache None: the KV cache when the router is causal."""
    if idx.shape[1] == 0:
        raise ValueError("generate: the prompt must hold at least one token")
    was_training = model.training
    model.eval()
    cached = uses_cache(model) if use_cache is None else use_cache
    window = model.cfg.seq_len
    keep = max(1, window - window // 4)  # positions re-encoded when the window is full
    cache = KVCache(model.cfg) if cached else None
    logits = _forward_last(model, idx[:, -window:], cache)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, generator, vocab_limit)  # [B]
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        if stop_token is not None and bool((nxt == stop_token).all()):
            break
        if cache is None:
            logits = _forward_last(model, idx[:, -window:], None)
        elif cache.length >= window:  # full: slide, re-encode the last `keep` tokens
            cache = KVCache(model.cfg)
            logits = _forward_last(model, idx[:, -keep:], cache)
        else:
            logits = _forward_last(model, nxt[:, None], cache)
    model.train(was_training)
    return idx


def _forward_last(model: MoETransformer, idx: Tensor, cache: KVCache | None) -> Tensor:
    """Logits [B, V] of the last position of idx [B, T] (appended to the cache when given)."""
    logits, _ = model(idx, cache=cache)
    return logits[:, -1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-train-generate",
        description="Sample a continuation of --prompt from the newest checkpoint of a moe-train "
        "run (any ep x dp layout it was trained in; loaded on one process), with the run's "
        "tokenizer and a KV cache. Prints the continuation to stdout.",
        parents=[run_arguments()],
    )
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)"
    )
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely; 0 = all")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument(
        "--no-stop", action="store_true", help="do not stop at the end-of-document token"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .run import RunError, autocast_for, load_run  # here: `import moe_train` stays light

    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0:
        build_parser().error("--max-new-tokens, --temperature and --top-k must be >= 0")
    try:
        run = load_run(args.run_dir, args.device, args.checkpoint)
    except (RunError, ValueError) as e:
        return fail("moe-train-generate", e)
    tok, device = run.tokenizer, next(run.model.parameters()).device
    prompt = torch.as_tensor(tok.encode(args.prompt), dtype=torch.long, device=device)[None]
    if prompt.shape[1] == 0:
        prompt = torch.full((1, 1), tok.eot_id, dtype=torch.long, device=device)  # from scratch
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    with autocast_for(device):
        out = generate(
            run.model, prompt, args.max_new_tokens, args.temperature, args.top_k or None, gen,
            vocab_limit=tok.vocab_size, stop_token=None if args.no_stop else tok.eot_id,
        )  # fmt: skip
    new = out[0, prompt.shape[1] :].tolist()
    seconds = time.perf_counter() - t0
    print(tok.decode([t for t in new if t != tok.eot_id]))
    print(
        f"[{run.checkpoint}, step {run.step}: {len(new)} tokens in {seconds:.2f} s on {device}, "
        f"{'KV cache' if uses_cache(run.model) else 'no cache (router is not causal)'}]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
