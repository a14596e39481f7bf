"""`moe-train-export RUN --format hf`: a folder a stock `transformers` class loads, no custom code.

    DIR/model.safetensors       per-expert tensors under the Hub's names (what transformers v4,
                                v5's save_pretrained and vLLM read), float32
    DIR/config.json             the family's fields (arch.hf_config)
    DIR/generation_config.json  the token ids
    DIR/tokenizer.json          our tokenizer as a `tokenizers` file (the byte tokenizer as a
    DIR/tokenizer_config.json   byte-fallback model: the same ids for every text)

After writing, the folder's tensors are read back and every one compared with the checkpoint
(conversion.compare); the export fails, naming the tensor, on any mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...model import MoETransformer
from .arch import Family, HFExportError, choose, conversion, hf_config
from .conversion import Conversion, Ref, compare

WEIGHTS = "model.safetensors"


def byte_tokenizer_json() -> str:
    """A `tokenizers` model whose ids are the UTF-8 bytes (ours): a BPE without merges whose
    vocabulary is <0xNN> for bytes 1..255 and NUL itself for 0 (the end-of-document token, also
    a special token), so every character falls back to its bytes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {"\x00": 0, **{f"<0x{b:02X}>": b for b in range(1, 256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken("\x00", special=True, normalized=False)])
    return tok.to_str()


def write_tokenizer(tokenizer: Any, out: Path, vocab_size: int, max_len: int) -> tuple[int, str]:
    """tokenizer.json + tokenizer_config.json in `out`; (end-of-text id, its text)."""
    if tokenizer.vocab_size > vocab_size:
        raise HFExportError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, more than model.vocab_size="
            f"{vocab_size}: ids past the embedding would fail; retrain with a larger vocab_size"
        )
    if tokenizer.name == "bytes":
        text = byte_tokenizer_json()
        eot = "\x00"
    else:
        text = tokenizer.tok.to_str()
        eot = tokenizer.tok.id_to_token(tokenizer.eot_id)
    (out / "tokenizer.json").write_text(text)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot,
        "eos_token": eot,
        "pad_token": eot,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return int(tokenizer.eot_id), eot


def our_tensor(state: dict[str, Tensor]) -> Any:
    def get(ref: Ref) -> Tensor:
        t = state[ref.name]
        return t if ref.expert is None else t[ref.expert]

    return get


def export_hf(
    model: MoETransformer, out: str | Path, tokenizer: Any, arch: str | None = None
) -> tuple[Family, list[Path]]:
    """Write `model` (1-process, every expert) as a stock HF folder; (its family, the files)."""
    from safetensors.torch import save_file

    if any(layer.dispatcher.num_local != layer.num_experts for layer in model.moe_layers()):
        raise ValueError("export needs a model that holds every expert (built with ep=1)")
    fam = choose(model.cfg, model.router_cfg, arch)
    conv = conversion(fam, model.cfg, model.router_cfg)  # checked: a bijection
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    ours = our_tensor(state)
    tensors = {
        p.hf: (torch.zeros(p.zero_shape) if p.ref is None else p.take(ours(p.ref))).contiguous()
        for p in conv.pieces
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    eos, _ = write_tokenizer(tokenizer, out, model.cfg.vocab_size, model.cfg.seq_len)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    del tensors
    config = hf_config(fam, model.cfg, model.router_cfg, eos_id=eos, bos_id=eos)
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    generation = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=1) + "\n")
    verify_folder(out, conv, ours)
    names = (WEIGHTS, "config.json", "generation_config.json", "tokenizer.json")
    return fam, [out / n for n in (*names, "tokenizer_config.json")]


def verify_folder(out: Path, conv: Conversion, ours: Any) -> None:
    """Read every tensor of out/model.safetensors back and compare it with ours (names, shapes,
    values): a missing, extra, duplicated or swapped expert fails here by name."""
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS), framework="pt") as f:
        compare(conv, ours, f.get_tensor, list(f.keys()), str(out / WEIGHTS))
