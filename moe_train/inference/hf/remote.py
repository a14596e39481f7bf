"""`moe-train-export RUN --format hf-remote`: a folder transformers loads with moe-train's own
modeling file (remote code), for the routers and bodies no stock class holds (sam, prototype,
tree, the GPT-2 body, ...).

    DIR/config.json             model_type "moe_train", auto_map -> modeling_moe_train.py, the
                                shape under HF's names, the body and router fields, and the
                                source configs under "moe_train" (provenance)
    DIR/modeling_moe_train.py   MoETrainConfig, MoETrainModel, MoETrainForCausalLM: torch and
                                transformers only (moe-train is not imported to load it)
    DIR/model.safetensors       our tensors under `model.` + their moe-train names (the head:
                                lm_head.weight, absent when tied), experts stacked [E, ...], fp32
    DIR/generation_config.json  the token ids
    DIR/tokenizer.json, tokenizer_config.json   as --format hf (export.write_tokenizer)

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

computes the dropless eval forward (no router noise) and generates with a KV cache. What the
modeling file does not compute is refused by field name; nothing is exported approximately.
Expert Choice is refused: its eval forward is not causal. After writing, every tensor is read
back and compared with the checkpoint (names, shapes, values, expert by expert), and the file's
names and shapes with the ones the modeling file builds from config.json.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...model import ModelConfig, MoETransformer
from ...routing import RouterConfig, router_class
from .arch import MODEL_TRAINING_ONLY, HFExportError, changed_options
from .conversion import ConversionError
from .export import WEIGHTS, write_tokenizer

MODELING = "modeling_moe_train.py"
ARCHITECTURE = "MoETrainForCausalLM"
AUTO_MAP = {
    "AutoConfig": "modeling_moe_train.MoETrainConfig",
    "AutoModel": "modeling_moe_train.MoETrainModel",
    "AutoModelForCausalLM": "modeling_moe_train.MoETrainForCausalLM",
}
# the router kinds modeling_moe_train.py computes (every one routes each token on its own)
KINDS = {
    "switch": "argmax of the softmax, weight its probability",
    "topk": "top-k of softmax or sigmoid scores (groups, bias, renormalisation, scale)",
    "prototype": "top-1 in each of k prototypes",
    "sam": "the best device group by summed probability, top-k inside it",
    "tree": "the root-to-leaf path of the gating units' sign bits",
}
# why a kind whose router class is not causal (Router.causal) cannot be exported
NOT_CAUSAL = {
    "expert_choice": (
        "Expert Choice is not causal: in eval every expert still picks its top-C tokens of the "
        "whole routing group, so a token's experts depend on the tokens after it and a decoder "
        "that sees one token at a time (generate(), a server with a KV cache) cannot compute it"
    ),
}
ALTERNATIVE = "export it with `--format moe-train` (moe_train.from_pretrained runs it as trained)"
# every ModelConfig field config.json carries (the rest: MODEL_TRAINING_ONLY)
MODEL_MAPPED = tuple(f.name for f in fields(ModelConfig) if f.name not in MODEL_TRAINING_ONLY)
ROUTER_MAPPED = (
    "kind", "top_k", "num_groups", "topk_groups", "score", "normalize_topk", "route_scale",
    "bias_update_rate", "eval_capacity_factor", "tree_depth", "tree_gate",
)  # fmt: skip
# fields that act only in training forwards (capacity, losses, noise, init) or on refused kinds;
# `normalize` differs only when slots are dropped, which the dropless eval never does
ROUTER_TRAINING_ONLY = (
    "capacity_factor", "drop_policy", "normalize", "group_size", "z_loss_coef", "balance_coef",
    "alignment_coef", "jitter_eps", "random_routing", "init_scale", "router_dtype",
    "max_experts_per_token",
)  # fmt: skip


def remote_refusals(model: ModelConfig, router: RouterConfig) -> list[str]:
    """Why modeling_moe_train.py cannot compute this model exactly ([] = it can)."""
    out = []
    if not router_class(router.kind).causal:
        why = NOT_CAUSAL.get(router.kind, "its router is not causal (a token's experts depend "
                             "on other tokens), which a KV-cached decoder cannot compute")  # fmt: skip
        out.append(f"router.kind={router.kind!r}: {why}")
    elif KINDS.get(router.kind) is None:
        out.append(
            f"router.kind={router.kind!r}: modeling_moe_train.py routes {', '.join(KINDS)} only"
        )
    if router.eval_capacity_factor is not None:
        out.append(
            f"router.eval_capacity_factor={router.eval_capacity_factor}: capacity drops tokens "
            "in eval; the exported model runs every token (set it to null to export the "
            "dropless model)"
        )
    known_model, known_router = (
        MODEL_MAPPED + MODEL_TRAINING_ONLY,
        ROUTER_MAPPED + ROUTER_TRAINING_ONLY,
    )
    for name, value in changed_options(model, router, known_model, known_router):
        out.append(
            f"{name}={value!r}: modeling_moe_train.py does not compute this option yet "
            "(moe_train/inference/hf/remote.py)"
        )
    return out


def check_remote(model: ModelConfig, router: RouterConfig) -> None:
    """HFExportError naming every field the modeling file cannot compute, and the alternative."""
    bad = remote_refusals(model, router)
    if bad:
        raise HFExportError(
            "--format hf-remote cannot export this model exactly: "
            + "; ".join(bad)
            + ". "
            + ALTERNATIVE
        )


def remote_config(model: ModelConfig, router: RouterConfig, eos_id: int) -> dict[str, Any]:
    """config.json: every field MoETrainConfig reads, from ours."""
    return {
        "architectures": [ARCHITECTURE],
        "auto_map": AUTO_MAP,
        "model_type": "moe_train",
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_width,
        "intermediate_size": model.d_ff,
        "moe_intermediate_size": model.expert_d_ff or model.d_ff,
        "num_experts": router.num_experts_for(model.num_experts),
        "num_experts_per_tok": int(router.experts_per_token()),
        "moe_every": model.moe_every,
        "first_dense": model.first_dense,
        "shared_experts": model.shared_experts,
        "shared_intermediate_size": model.shared_width,
        "shared_gate": model.shared_gate,
        "activation": model.activation,
        "norm": model.norm,
        "norm_eps": model.norm_eps,
        "position": model.position,
        "rope_theta": model.rope_theta,
        "qk_norm": model.qk_norm,
        "max_position_embeddings": model.seq_len,
        "tie_word_embeddings": model.tie_embeddings,
        "router_kind": router.kind,
        "router_top_k": router.top_k,
        "router_num_groups": router.num_groups,
        "router_topk_groups": router.topk_groups,
        "router_score": router.score,
        "router_normalize_topk": router.normalize_topk,
        "router_route_scale": router.route_scale,
        "router_score_bias": router.bias_update_rate > 0,
        "router_tree_depth": router.tree_depth,
        "router_tree_gate": router.tree_gate,
        "initializer_range": model.init_std,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "use_cache": True,
        "dtype": "float32",
        # the configs it was exported from (ModelConfig's fields only), for the record
        "moe_train": {
            "model": {f.name: getattr(model, f.name) for f in fields(ModelConfig)},
            "router": asdict(router),
        },
    }


def hf_name(name: str) -> str:
    """Our state-dict name -> the folder's: `model.` + it; the head is lm_head.weight."""
    return "lm_head.weight" if name == "head.weight" else "model." + name


def is_stacked(name: str) -> bool:
    """An expert bank's [E, ...] tensor (compared expert by expert)."""
    return name.endswith(("ffn.experts.w_in", "ffn.experts.w_out"))


def our_state(model: MoETransformer) -> dict[str, Tensor]:
    """The 1-process model's tensors by name (the tied head left out), contiguous fp32 on CPU."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("head.weight", None)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def export_hf_remote(model: MoETransformer, out: str | Path, tokenizer: Any) -> list[Path]:
    """Write `model` (1-process, every expert) as a remote-code folder; the files written."""
    from safetensors.torch import save_file

    if any(layer.dispatcher.num_local != layer.num_experts for layer in model.moe_layers()):
        raise ValueError("export needs a model that holds every expert (built with ep=1)")
    check_remote(model.cfg, model.router_cfg)
    state = our_state(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    eos, _ = write_tokenizer(tokenizer, out, model.cfg.vocab_size, model.cfg.seq_len)
    save_file({hf_name(k): v for k, v in state.items()}, str(out / WEIGHTS), {"format": "pt"})
    config = remote_config(model.cfg, model.router_cfg, eos)
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    generation = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=1) + "\n")
    shutil.copyfile(Path(__file__).with_name(MODELING), out / MODELING)
    verify_remote(out, state)
    names = ("config.json", MODELING, WEIGHTS, "generation_config.json", "tokenizer.json")
    return [out / n for n in (*names, "tokenizer_config.json")]


def expected_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The tensors (name -> shape) the folder's modeling file builds from its config.json, the
    tied head left out: what from_pretrained will fill."""
    from .modeling_moe_train import MoETrainConfig, MoETrainForCausalLM

    config = MoETrainConfig.from_dict(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        hf = MoETrainForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def verify_remote(folder: Path, state: dict[str, Tensor]) -> None:
    """Read every tensor of folder/model.safetensors back: the names must be ours (hf_name) and
    the modeling file's, each shape and value ours, an expert bank expert by expert. A missing,
    extra, renamed, duplicated or swapped tensor or expert fails here by name."""
    from safetensors import safe_open

    path = folder / WEIGHTS
    want = {hf_name(k): k for k in state}
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        missing, extra = sorted(set(want) - set(keys)), sorted(set(keys) - set(want))
        if missing or extra:
            raise ConversionError(f"{path}: missing {missing[:5]}, extra {extra[:5]}")
        for name in keys:
            ours, got = state[want[name]], f.get_tensor(name)
            if tuple(got.shape) != tuple(ours.shape):
                raise ConversionError(
                    f"{path}: {name} has shape {list(got.shape)}, the checkpoint's "
                    f"{want[name]} {list(ours.shape)}"
                )
            parts = range(ours.shape[0]) if is_stacked(name) else [None]
            for e in parts:
                a, b = (got, ours) if e is None else (got[e], ours[e])
                if not torch.equal(a.to(b.dtype), b):
                    which = name if e is None else f"{name}[expert {e}]"
                    raise ConversionError(
                        f"{path}: {which} does not hold the checkpoint's values of {want[name]}"
                        + ("" if e is None else f" expert {e}")
                    )
    built = expected_shapes(folder)
    file = {hf_name(k): tuple(v.shape) for k, v in state.items()}
    if built != file:
        diff = sorted(set(built.items()) ^ set(file.items()))
        raise ConversionError(
            f"{folder / MODELING} builds other tensors from config.json than the file holds: "
            f"{diff[:5]}"
        )
