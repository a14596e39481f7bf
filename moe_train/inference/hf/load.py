"""Import: a Hugging Face folder (Mixtral / Qwen3-MoE / Qwen2-MoE, safetensors) into a run.

`read_hf_config(DIR)` turns config.json into our model + router fields (refusing by name what
we cannot compute); `HFFolder` indexes the tensors (one file or the shards of
model.safetensors.index.json; per-expert names, or transformers v5's fused
`mlp.experts.gate_up_proj [E, 2f, d]` / `down_proj [E, d, f]`, seen as per-expert names) and reads
boxes of them lazily (safetensors slices: nothing else is read); `load_into(model, DIR)` fills
every tensor this rank holds (its experts, its FSDP shard) through the same checked conversion as
the export. Never a pickle, never remote code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...model import ModelConfig
from ...routing import RouterConfig
from .arch import FAMILIES, Family, conversion, our_shapes
from .conversion import ConversionError, Piece, Ref

INDEX = "model.safetensors.index.json"
MODEL_TYPES = {f.model_type: f for f in FAMILIES.values()}
# config.json fields that change nothing we compute (training knobs of HF, bookkeeping)
IGNORED = {
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "use_cache",
    "output_router_logits", "router_aux_loss_coef", "initializer_range", "bos_token_id",
    "eos_token_id", "pad_token_id", "attention_dropout", "max_position_embeddings",
    "max_window_layers", "_name_or_path", "rope_theta", "rope_parameters", "rope_scaling",
    "layer_types", "sliding_window", "use_sliding_window", "qkv_bias", "attention_bias",
    "shared_expert_intermediate_size", "hidden_act", "router_jitter_noise", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers", "tie_word_embeddings", "head_dim",
    "num_experts", "num_local_experts", "num_experts_per_tok", "vocab_size", "hidden_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
    "moe_intermediate_size", "rms_norm_eps",
}  # fmt: skip


class HFImportError(ValueError):
    """A Hugging Face folder moe-train cannot start from exactly; the message names the field or
    tensor and what to do."""


def _family(config: dict[str, Any], where: str) -> Family:
    mt = config.get("model_type")
    if mt not in MODEL_TYPES:
        raise HFImportError(
            f"{where}: model_type {mt!r} is not one moe-train imports; supported: "
            + ", ".join(f.model_type for f in FAMILIES.values() if not f.refused)
        )
    fam = MODEL_TYPES[mt]
    if fam.refused:
        raise HFImportError(f"{where}: {fam.architecture}: {fam.refused}")
    return fam


def read_hf_config(folder: str | Path) -> tuple[Family, dict[str, Any], dict[str, Any]]:
    """(family, ModelConfig fields, RouterConfig fields) of an HF folder's config.json."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise HFImportError(f"{path} not found: give a Hugging Face model folder")
    c = json.loads(path.read_text())
    fam = _family(c, str(path))
    bad = [f"{k}={c[k]!r}" for k in sorted(c) if k not in IGNORED and c[k] not in (None, False)]

    def refuse(field: str, why: str) -> None:
        bad.append(f"{field}={c.get(field)!r} ({why})")

    rope = c.get("rope_parameters") or {}
    if (rope.get("rope_type") or "default") != "default" or c.get("rope_scaling"):
        refuse("rope_parameters", "only the default RoPE; no scaling")
    if c.get("use_sliding_window") or (c.get("sliding_window") and fam.name == "mixtral"):
        refuse("sliding_window", "moe-train attends over the whole window")
    if any(t != "full_attention" for t in c.get("layer_types") or []):
        refuse("layer_types", "full attention only")
    if c.get("qkv_bias") or c.get("attention_bias"):
        refuse("qkv_bias" if "qkv_bias" in c else "attention_bias", "our linears have no bias")
    if c.get("shared_expert_intermediate_size") and not fam.shared:
        refuse("shared_expert_intermediate_size", f"{fam.architecture} has no shared expert")
    if c.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "SwiGLU (silu) only")
    k = int(c.get("num_experts_per_tok", 2))
    renorm = fam.name == "mixtral" or bool(c.get("norm_topk_prob"))
    L = int(c["num_hidden_layers"])
    step = int(c.get("decoder_sparse_step") or 1)
    sparse = [i for i in range(L) if (i + 1) % step == 0]
    only = set(c.get("mlp_only_layers") or [])
    first_dense = max((i + 1 for i in only if i in sparse), default=0)
    if {i for i in sparse if i in only} != {i for i in sparse if i < first_dense}:
        refuse("mlp_only_layers", "dense layers must be the first k (model.first_dense)")
    if bad:
        raise HFImportError(
            f"{path}: moe-train cannot compute this {fam.architecture} exactly: " + "; ".join(bad)
        )
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    heads = int(c["num_attention_heads"])
    expert_ff = c.get("moe_intermediate_size") or c["intermediate_size"]
    model = {
        "vocab_size": int(c["vocab_size"]),
        "d_model": int(c["hidden_size"]),
        "n_layers": L,
        "n_heads": heads,
        "n_kv_heads": int(c.get("num_key_value_heads") or heads),
        "head_dim": int(c.get("head_dim") or c["hidden_size"] // heads),
        "d_ff": int(c["intermediate_size"]),
        "expert_d_ff": int(expert_ff),
        "num_experts": int(c.get("num_experts") or c.get("num_local_experts")),
        "moe_every": step,
        "first_dense": first_dense,
        "activation": "swiglu",
        "norm": "rmsnorm",
        "norm_eps": float(c.get("rms_norm_eps", 1e-6)),
        "position": "rope",
        "rope_theta": float(theta),
        "qk_norm": fam.qk_norm,
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
    }
    shared = int(c.get("shared_expert_intermediate_size") or 0) if fam.shared else 0
    if shared:  # Qwen2-MoE's gated shared expert: one of width H (a zero width: none)
        model |= {"shared_experts": 1, "shared_d_ff": shared, "shared_gate": True}
    router: dict[str, Any]
    if k == 1 and not renorm:  # the probability of the one expert: switch
        router = {"kind": "switch", "top_k": 2}
    else:  # top-k, renormalised (norm_topk_prob) or the raw softmax probabilities
        router = {"kind": "topk", "top_k": k, "normalize_topk": renorm}
    router["eval_capacity_factor"] = None
    if c.get("router_jitter_noise"):
        router["jitter_eps"] = float(c["router_jitter_noise"])
    return fam, model, router


@dataclass(frozen=True)
class _Source:
    file: Path
    key: str
    expert: int | None = None  # a fused [E, ...] tensor's expert
    rows: tuple[int, int] | None = None  # and its rows (gate or up half of gate_up_proj)


_FUSED = re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.(gate_up_proj|down_proj)$")


class HFFolder:
    """The tensors of an HF folder by their per-expert names, with shapes, read lazily."""

    def __init__(self, folder: str | Path, fam: Family):
        from safetensors import safe_open

        self.folder, self.fam = Path(folder), fam
        files = self._files()
        self.sources: dict[str, _Source] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file, names in files.items():
            with safe_open(str(file), framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise HFImportError(
                            f"{self.folder / INDEX} maps {name} to {file.name}, which lacks it"
                        )
                    self._add(file, name, tuple(f.get_slice(name).get_shape()))
        self._handles: dict[Path, Any] = {}

    def _files(self) -> dict[Path, list[str]]:
        from safetensors import safe_open

        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            files: dict[Path, list[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(self.folder / file, []).append(name)
            missing = sorted(p.name for p in files if not p.is_file())
            if missing:
                raise HFImportError(
                    f"{index}: shard(s) {', '.join(missing)} missing from {self.folder}; "
                    "download every shard the index names"
                )
            return files
        single = self.folder / "model.safetensors"
        if not single.is_file():
            pickles = sorted(p.name for p in self.folder.glob("*.bin"))
            raise HFImportError(
                f"{self.folder}: no model.safetensors or {INDEX}"
                + (f" (found {', '.join(pickles)}: pickles are never loaded; convert them to "
                   "safetensors)" if pickles else "")
            )  # fmt: skip
        with safe_open(str(single), framework="pt") as f:
            return {single: list(f.keys())}

    def _put(self, name: str, source: _Source, shape: tuple[int, ...]) -> None:
        if name in self.sources:
            raise HFImportError(f"{self.folder}: {name} is stored twice (a duplicated tensor)")
        self.sources[name], self.shapes[name] = source, shape

    def _add(self, file: Path, key: str, shape: tuple[int, ...]) -> None:
        m = _FUSED.match(key)
        if m is None:
            if self.fam.moe != "mlp":  # v5's in-memory name of Mixtral's MoE block
                key_as = re.sub(
                    r"^(model\.layers\.\d+\.)mlp\.gate\.", rf"\1{self.fam.moe}.gate.", key
                )
            else:
                key_as = key
            self._put(key_as, _Source(file, key), shape)
            return
        prefix, kind = m.groups()
        gate, up, down = self.fam.experts
        base = f"{prefix}{self.fam.moe}.experts."
        for e in range(shape[0]):
            if kind == "gate_up_proj":  # [E, 2f, d]: gate rows, then up rows
                f = shape[1] // 2
                self._put(f"{base}{e}.{gate}.weight", _Source(file, key, e, (0, f)), (f, shape[2]))
                self._put(
                    f"{base}{e}.{up}.weight", _Source(file, key, e, (f, 2 * f)), (f, shape[2])
                )
            else:
                self._put(f"{base}{e}.{down}.weight", _Source(file, key, e), tuple(shape[1:]))

    def read(self, name: str, box: tuple[tuple[int, int], ...]) -> Tensor:
        """The box (one (start, stop) per dim) of tensor `name`, read alone, as float32."""
        from safetensors import safe_open

        s = self.sources[name]
        if s.file not in self._handles:
            self._handles[s.file] = safe_open(str(s.file), framework="pt")
        sl = self._handles[s.file].get_slice(s.key)
        index = [slice(a, b) for a, b in box]
        if s.expert is not None:
            if s.rows is not None:
                index[0] = slice(s.rows[0] + box[0][0], s.rows[0] + box[0][1])
            index = [slice(s.expert, s.expert + 1), *index]
            return sl[tuple(index)][0].float()
        return sl[tuple(index)].float()


def _local_box(view: Tensor) -> tuple[Tensor, tuple[tuple[int, int], ...]]:
    """(this rank's local tensor of `view`, its box in the global tensor): the whole tensor for
    a plain one, the shard's offsets for a DTensor (FSDP)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(view, DTensor):
        return view, tuple((0, n) for n in view.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        view.shape, view.device_mesh, view.placements
    )
    local = view.to_local()
    return local, tuple((o, o + n) for o, n in zip(offset, shape))


def _fill(
    local: Tensor, box: tuple[tuple[int, int], ...], pieces: list[Piece], hf: HFFolder
) -> int:
    """Copy into `local` (our tensor's `box`) the part of every piece that falls in it; the
    values written."""
    done = 0
    for p in pieces:
        cut = tuple((max(a, c), min(b, d)) for (a, b), (c, d) in zip(p.region, box))
        if any(a >= b for a, b in cut):
            continue
        rel = tuple((a - r0, b - r0) for (a, b), (r0, _) in zip(cut, p.region))
        value = hf.read(p.hf, rel[::-1] if p.transpose else rel)
        dest = local[tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(cut, box))]
        value = value / p.scale if p.scale != 1.0 else value  # a power of two: exact
        dest.copy_(value.t() if p.transpose else value)
        done += value.numel()
    return done


def _ref(key: str) -> Ref:
    """A checkpoint key (moe_train.checkpoint.keys) as a Ref: model/<fqn>[/expert_<id>]."""
    name = key.removeprefix("model/")
    if "/expert_" in name:
        fqn, e = name.rsplit("/expert_", 1)
        return Ref(fqn, int(e))
    return Ref(name)


@torch.no_grad()
def load_into(model: nn.Module, folder: str | Path) -> int:
    """Fill every parameter `model` (one rank's: any ep x dp, FSDP or not) holds from the HF
    folder; each rank reads only its boxes. Every tensor of the folder must be one the
    conversion consumes and have its shape, every value we hold must be written: else
    HFImportError naming the tensor. The values this rank wrote."""
    from ...checkpoint.keys import state_views

    cfg: ModelConfig = model.cfg  # type: ignore[assignment]
    router: RouterConfig = model.router_cfg  # type: ignore[assignment]
    fam, _, _ = read_hf_config(folder)
    try:
        conv = conversion(fam, cfg, router)
    except ConversionError as e:
        raise HFImportError(str(e)) from e
    hf = HFFolder(folder, fam)
    expected = conv.hf_names()
    missing = sorted(set(expected) - set(hf.shapes))
    extra = sorted(set(hf.shapes) - set(expected))
    if missing or extra:
        raise HFImportError(
            f"{folder}: does not match its config.json ({fam.architecture}): missing "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}"
        )
    for name, piece in expected.items():
        if hf.shapes[name] != piece.hf_shape:
            raise HFImportError(
                f"{folder}: {name} has shape {list(hf.shapes[name])}, config.json says "
                f"{list(piece.hf_shape)}"
            )
    by_ref: dict[Ref, list[Piece]] = {}
    for p in conv.pieces:
        if p.ref is not None:
            by_ref.setdefault(p.ref, []).append(p)
    shapes = our_shapes(cfg, router)
    views, _ = state_views(model, None)
    written = 0
    for key, view in views.items():
        ref = _ref(key)
        if ref not in shapes:
            raise HFImportError(f"{key}: a tensor of the model no Hugging Face tensor fills")
        local, box = _local_box(view)
        n = _fill(local, box, by_ref[ref], hf)
        if n != local.numel():
            raise HFImportError(f"{key}: {n} of its {local.numel()} local values written")
        written += n
    return written
