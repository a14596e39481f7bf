"""`moe-train-export RUN_DIR --out DIR`: a run's newest checkpoint as one safetensors file.

    DIR/model.safetensors   every tensor of the model, all experts in global order (whatever the
                            ep x dp layout the run was trained in)
    DIR/config.json         {"format": "moe-train", "format_version": 1, "model": {...ModelConfig},
                            "router": {...RouterConfig}, "tokenizer": {...}, "source": {...}}
    DIR/tokenizer.json      the run's tokenizer (Hugging Face format); absent for the byte tokenizer
                            (config.json says {"type": "bytes", "vocab_size": 256, "eot_id": 0})

`moe_train.from_pretrained(DIR)` loads it back (same logits as the checkpoint).

Tensor names (float32, PyTorch's [out, in] layout for nn.Linear weights; V vocabulary, S seq_len,
d d_model, h n_heads, g n_kv_heads (h when null), dh head_dim (d / h when null), f d_ff (expert_d_ff
for experts; 2f for swiglu's input side: gate then up halves), E experts per MoE layer, U router
gate units):

    tok_emb.weight                    [V, d]
    pos_emb.weight                    [S, d]    model.position=learned only (rope: no tensor;
                                                its tables are recomputed, never stored)
    blocks.{i}.ln1.weight (/ .bias)   [d]       norm before attention (bias: layernorm only)
    blocks.{i}.attn.qkv.weight        [(h+2g)dh, d]  rows: q (h heads), k (g), v (g), dh each
    blocks.{i}.attn.q_norm.weight     [dh]      model.qk_norm=head only (also k_norm)
    blocks.{i}.attn.proj.weight       [d, h dh]
    blocks.{i}.ln2.weight (/ .bias)   [d]       norm before the FFN
  dense layers (model.is_moe_layer(i) false):
    blocks.{i}.ffn.w_in.weight        [f, d]    ([2f, d] for swiglu: gate rows, then up)
    blocks.{i}.ffn.w_out.weight       [d, f]
  MoE layers:
    blocks.{i}.ffn.router.gate.weight [U, d]    router logits = x @ gate.T (+ bias), in float32
    blocks.{i}.ffn.router.gate.bias   [U]       SAM only
    blocks.{i}.ffn.experts.w_in       [E, d, f] expert e's input matrix is w_in[e] (x @ w_in[e]);
                                                [E, d, 2f] for swiglu
    blocks.{i}.ffn.experts.w_out      [E, f, d] (note: [in, out], unlike nn.Linear)
    ln_f.weight (/ .bias)             [d]
    head.weight                       [V, d]    only when model.tie_embeddings is false (else
                                                the head is tok_emb.weight)

A block is x += attn(ln1(x)); x += ffn(ln2(x)); logits = ln_f(x) @ head.T. Norms: RMSNorm
(weight * x / sqrt(mean(x^2) + eps), in float32) or LayerNorm (model.norm). Attention is causal
softmax attention scaled by 1/sqrt(dh), query head j reading key/value head j // (h / g); RoPE
(model.position=rope) rotates q and k in HF Llama's rotate-half layout (moe_train/model/rope.py).
GELU is the tanh approximation; SwiGLU is silu(gate) * up. How the router turns logits into expert
weights is its kind's (router.kind, docs/ROUTING.md). config.json's "model" names the body; one
without the body keys (an export older than them) is GPT-2's body (moe_train.model.LEGACY_BODY).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from ..model import ModelConfig, MoETransformer, with_legacy_body
from ..routing import RouterConfig
from .cli import fail, run_arguments

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT, FORMAT_VERSION = "moe-train", 1


def export_state(model: MoETransformer) -> dict[str, torch.Tensor]:
    """The 1-process model's tensors by name (tied head left out), contiguous float32 on CPU."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("head.weight", None)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def _tokenizer_entry(tok: Any) -> dict[str, Any]:
    return {"type": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id}


def export_model(
    model: MoETransformer, out: str | Path, tokenizer: Any, source: dict[str, Any] | None = None
) -> list[Path]:
    """Write model.safetensors, config.json and the tokenizer files into `out`; the paths."""
    from safetensors.torch import save_file

    if any(layer.dispatcher.num_local != layer.num_experts for layer in model.moe_layers()):
        raise ValueError("export needs a model that holds every expert (built with ep=1)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(export_state(model), str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": "MoETransformer",
        # ModelConfig's fields only (a run's TrainModelConfig adds trainer-side ones: init_from)
        "model": {f.name: getattr(model.cfg, f.name) for f in fields(ModelConfig)},
        "router": asdict(model.router_cfg),
        "tokenizer": _tokenizer_entry(tokenizer),
        "source": source or {},
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    tokenizer.save(out)
    written = [out / WEIGHTS_FILE, out / CONFIG_FILE]
    return written + ([out / "tokenizer.json"] if (out / "tokenizer.json").is_file() else [])


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: export a run with `moe-train-export`")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: not a moe-train export (format {config.get('format')!r}, version "
            f"{config.get('format_version')!r}; this moe-train reads {FORMAT} {FORMAT_VERSION})"
        )
    return config


def from_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> MoETransformer:
    """The model `moe-train-export` wrote into `folder` (config.json + model.safetensors), on
    `device`, in eval mode (the tensor names: this module's docstring)."""
    from safetensors.torch import load_file

    config = read_config(folder)
    # an export older than the body keys was trained with the GPT-2 body (LEGACY_BODY)
    model_cfg = ModelConfig(**with_legacy_body(config["model"]))
    model = MoETransformer(model_cfg, RouterConfig(**config["router"]))
    state = load_file(str(Path(folder) / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"head.weight"} if model.cfg.tie_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ValueError(
            f"{Path(folder) / WEIGHTS_FILE} does not match its config.json: missing "
            f"{sorted(set(missing) - allowed)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model.to(device).eval()


def load_pretrained_tokenizer(folder: str | Path) -> Any:
    """The tokenizer an export folder holds (bytes, or its tokenizer.json)."""
    from ..data.tokenizers import load_tokenizer

    return load_tokenizer(folder, read_config(folder)["tokenizer"]["type"])


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def main(argv: Sequence[str] | None = None) -> int:
    from .run import RunError, load_run  # here: `import moe_train` stays light

    p = argparse.ArgumentParser(
        prog="moe-train-export",
        description="Write a run's newest checkpoint as DIR/model.safetensors (one file, all "
        "experts in global order, from any ep x dp layout), DIR/config.json (model + router "
        "config) and the tokenizer; load it with moe_train.from_pretrained(DIR). Tensor names: "
        "`python -c 'import moe_train.inference.export as e; print(e.__doc__)'`.",
        parents=[run_arguments()],
    )
    p.set_defaults(device="cpu")  # the export is float32 on the CPU whatever loads it
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    p.add_argument(
        "--format",
        choices=("moe-train", "hf", "hf-remote"),
        default="moe-train",
        help="moe-train: our own format (moe_train.from_pretrained); hf: a stock Hugging Face "
        "class (Mixtral / Qwen3-MoE / Qwen2-MoE, chosen from the router and body), loaded by "
        "transformers.AutoModelForCausalLM with no custom code; hf-remote: a folder with "
        "moe-train's own modeling file (any body; switch, topk, prototype, sam, tree routers), "
        "loaded with trust_remote_code=True and no moe-train installed (default: %(default)s)",
    )
    p.add_argument(
        "--arch",
        choices=("mixtral", "qwen3_moe", "qwen2_moe", "olmoe"),
        help="--format hf: force this class (an error names what it cannot hold); not with "
        "the other formats",
    )
    args = p.parse_args(argv)
    if args.arch and args.format != "hf":
        p.error(f"--arch {args.arch} chooses a stock class: it goes with --format hf only")
    try:
        run = load_run(args.run_dir, args.device, args.checkpoint)
    except (RunError, ValueError) as e:
        return fail("moe-train-export", e)
    source = {"run_dir": str(args.run_dir), "checkpoint": str(run.checkpoint), "step": run.step}
    if args.format == "hf":
        from .hf.export import export_hf

        try:
            fam, paths = export_hf(run.model, args.out, run.tokenizer, args.arch)
        except ValueError as e:  # HFExportError, ConversionError: named
            return fail("moe-train-export", e)
        print(f"{fam.architecture}: every tensor read back and compared with the checkpoint")
    elif args.format == "hf-remote":
        from .hf.remote import ARCHITECTURE, export_hf_remote

        try:
            paths = export_hf_remote(run.model, args.out, run.tokenizer)
        except ValueError as e:  # HFExportError, ConversionError: named
            return fail("moe-train-export", e)
        print(
            f"{ARCHITECTURE} (remote code, trust_remote_code=True): every tensor read back and "
            "compared with the checkpoint"
        )
    else:
        paths = export_model(run.model, args.out, run.tokenizer, source)
    params = run.model.num_params()
    print(
        f"exported step {run.step} of {args.run_dir} ({params['total'] / 1e6:.2f}M parameters, "
        f"{len(run.model.moe_layers())} MoE layers) to "
        + ", ".join(f"{q} ({_size(q.stat().st_size)})" for q in paths)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
