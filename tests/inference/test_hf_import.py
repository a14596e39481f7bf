"""Import (`model.init_from=DIR`): a Hugging Face folder made here (config -> from_config ->
save_pretrained, no download) fills our model so its logits equal transformers'; per-expert and
v5's fused layouts, one file or shards; every tensor consumed, every parameter filled, else a
named error; config overrides that contradict config.json are errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_train.inference.hf.export import export_hf
from moe_train.inference.hf.load import HFImportError, load_into, read_hf_config
from moe_train.model import ModelConfig, MoETransformer
from moe_train.routing import RouterConfig
from tests.inference.hf_cases import max_rel

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=12, max_position_embeddings=32, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, tie_word_embeddings=False,
)  # fmt: skip
HF_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
    ),  # fmt: skip
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **COMMON,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=1,
        norm_topk_prob=False,
        qkv_bias=False,
        shared_expert_intermediate_size=0,
    ),  # fmt: skip
}


def hf_model(fam: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[fam]()).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # the init's zeros and ones would hide a mix-up
    return model


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """family -> (HF model, its save_pretrained folder)."""
    out = {}
    for fam in HF_CONFIGS:
        model = hf_model(fam)
        folder = tmp_path_factory.mktemp("hf_" + fam)
        model.save_pretrained(folder)
        out[fam] = (model, folder)
    return out


def ours_from(folder: Path) -> MoETransformer:
    fam, model_fields, router_fields = read_hf_config(folder)
    model = MoETransformer(ModelConfig(seq_len=32, **model_fields), RouterConfig(**router_fields))
    load_into(model, folder)
    return model.eval()


def logits_match(hf, ours: MoETransformer) -> float:
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return max_rel(ours(idx)[0], hf(idx).logits)


@pytest.mark.parametrize("fam", list(HF_CONFIGS))
def test_an_imported_folder_computes_transformers_logits(hf_folders, fam, tmp_path):
    hf, folder = hf_folders[fam]
    ours = ours_from(folder)
    assert logits_match(hf, ours) < 1e-5
    got, _ = export_hf(ours, tmp_path, __import__("moe_train").data.tokenizers.ByteTokenizer())
    assert got.name == fam  # the round trip lands on the class it came from
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert logits_match(back, ours) < 1e-5


def test_the_fused_v5_layout_and_shards_load_alike(hf_folders, tmp_path):
    """v5's in-memory state dict (mlp.experts.gate_up_proj [E, 2f, d]) written as two shards."""
    from safetensors.torch import save_file

    hf, folder = hf_folders["mixtral"]
    state = {k: v.detach().contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    names = sorted(state)
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file))
    index = {"weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    assert logits_match(hf, ours_from(tmp_path)) < 1e-5
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(HFImportError, match=r"shard\(s\) b.safetensors missing"):
        ours_from(tmp_path)


def _edited(folder: Path, out: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text((folder / "config.json").read_text())
    return out


X0 = "model.layers.1.block_sparse_moe.experts.0.w2.weight"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop(X0), r"missing \['" + X0),
        (lambda t: t.update({X0.replace(".0.", ".7."): t.pop(X0)}), r"unexpected \['.*experts\.7"),
        (
            lambda t: t.update({"model.layers.1.mlp.experts.down_proj": t[X0][None].clone()}),
            "stored twice",
        ),
        (lambda t: t.update({X0: t[X0][:, :-1].contiguous()}), X0 + r" has shape \[32, 23\]"),
    ],
    ids=["removed", "renamed", "duplicated", "mis-shaped"],
)
def test_a_missing_extra_duplicated_or_misshaped_tensor_fails_import_by_name(
    hf_folders, tmp_path, edit, message
):
    _, folder = hf_folders["mixtral"]
    bad = _edited(folder, tmp_path / "bad", edit)
    with pytest.raises(HFImportError, match=message):
        ours_from(bad)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "llama"}, "model_type 'llama' is not one moe-train imports"),
        ({"model_type": "olmoe"}, "OLMoE normalises q and k"),
        ({"sliding_window": 16}, "sliding_window=16"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"some_new_option": 3}, "some_new_option=3"),
    ],
)
def test_what_we_cannot_compute_is_refused_by_name(hf_folders, tmp_path, change, message):
    _, folder = hf_folders["mixtral"]
    config = json.loads((folder / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFImportError, match=message):
        read_hf_config(tmp_path)


def test_qkv_bias_and_a_shared_expert_outside_qwen2_are_refused(hf_folders, tmp_path):
    for fam, change, message in (
        ("qwen2_moe", {"qkv_bias": True}, "qkv_bias=True"),
        ("qwen3_moe", {"shared_expert_intermediate_size": 8}, "Qwen3MoeForCausalLM has no shared"),
    ):
        config = json.loads((hf_folders[fam][1] / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps(config | change))
        with pytest.raises(HFImportError, match=message):
            read_hf_config(tmp_path)


def test_an_override_that_contradicts_config_json_is_an_error(hf_folders):
    from moe_train.training.init_from import apply_init_from, explicit_fields
    from tests.helpers.runs import compose_cfg

    _, folder = hf_folders["mixtral"]
    cfg = compose_cfg(f"model.init_from={folder}", "model.d_model=64", "router=switch")
    with pytest.raises(ValueError, match=r"model.d_model=64 contradicts .*config.json .*: 32"):
        apply_init_from(cfg, explicit_fields(["model.d_model=64", "router=switch"]))
    cfg = compose_cfg(f"model.init_from={folder}", "router=switch")
    apply_init_from(cfg, explicit_fields(["router=switch"]))  # a group, not a field: set
    assert (cfg.model.d_model, cfg.router.kind, cfg.router.top_k) == (32, "topk", 2)
