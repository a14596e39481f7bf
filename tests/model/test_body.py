"""The body options (ModelConfig: norm, position, n_kv_heads, head_dim, qk_norm, activation,
first_dense): the same logits as Hugging Face's Llama (no qk-norm) and Qwen3 (qk-norm) in fp32 on
the same weights, the layer pattern, named errors for every bad combination, and the configs that
pick each body."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from moe_train.config import CONFIG_DIR, TrainModelConfig
from moe_train.layer import MoELayer
from moe_train.model import LEGACY_BODY, ModelConfig, MoETransformer, RMSNorm, with_legacy_body
from moe_train.routing import RouterConfig
from tests.helpers.runs import compose_cfg

DENSE = ModelConfig(
    vocab_size=96, seq_len=32, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24,
    d_ff=80, moe_every=0, rope_theta=5000.0, norm_eps=1e-6,
)  # fmt: skip


def hf_state(model: MoETransformer) -> dict[str, torch.Tensor]:
    """Our dense body's tensors under HF Llama/Qwen3 names (q, k, v rows of the fused qkv;
    gate, up halves of w_in): the renaming an export does."""
    cfg = model.cfg
    q, kv, f = cfg.n_heads * cfg.head_width, cfg.kv_heads * cfg.head_width, cfg.d_ff
    sd = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.ln_f.weight}
    for i, b in enumerate(model.blocks):
        p, w, w_in = f"model.layers.{i}.", b.attn.qkv.weight, b.ffn.w_in.weight
        sd |= {
            p + "self_attn.q_proj.weight": w[:q], p + "self_attn.k_proj.weight": w[q : q + kv],
            p + "self_attn.v_proj.weight": w[q + kv :], p + "self_attn.o_proj.weight": b.attn.proj.weight,
            p + "input_layernorm.weight": b.ln1.weight, p + "post_attention_layernorm.weight": b.ln2.weight,
            p + "mlp.gate_proj.weight": w_in[:f], p + "mlp.up_proj.weight": w_in[f:],
            p + "mlp.down_proj.weight": b.ffn.w_out.weight,
        }  # fmt: skip
        if b.attn.q_norm is not None and b.attn.k_norm is not None:
            sd[p + "self_attn.q_norm.weight"] = b.attn.q_norm.weight
            sd[p + "self_attn.k_norm.weight"] = b.attn.k_norm.weight
    return {k: v.detach().clone() for k, v in sd.items()}


@pytest.mark.parametrize("qk_norm", ["none", "head"])
def test_the_modern_body_computes_what_hf_llama_and_qwen3_compute(qk_norm):
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = replace(DENSE, qk_norm=qk_norm)
    torch.manual_seed(0)
    model = MoETransformer(cfg, RouterConfig()).eval()
    with torch.no_grad():  # away from the init's ones and small values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    common = dict(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=32,
        rms_norm_eps=1e-6, rope_theta=5000.0, tie_word_embeddings=True, attention_bias=False,
    )  # fmt: skip
    if qk_norm == "none":
        hf_cfg = transformers.LlamaConfig(**common, mlp_bias=False)
        hf = transformers.LlamaForCausalLM(hf_cfg)
    else:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    missing, unexpected = hf.load_state_dict(hf_state(model), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    idx = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits.float()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_first_dense_and_moe_every_pick_the_moe_layers():
    def moe_layers(**kw) -> list[int]:
        cfg = ModelConfig(n_layers=6, **kw)
        built = MoETransformer(replace(cfg, d_model=32, d_ff=32, seq_len=8), RouterConfig())
        kinds = [i for i, b in enumerate(built.blocks) if isinstance(b.ffn, MoELayer)]
        assert kinds == [i for i in range(6) if cfg.is_moe_layer(i)]
        return kinds

    assert moe_layers(moe_every=2) == [1, 3, 5]  # Qwen's decoder_sparse_step = 2
    assert moe_layers(moe_every=1, first_dense=1) == [1, 2, 3, 4, 5]  # DeepSeek-V3's first_k
    assert moe_layers(moe_every=2, first_dense=4) == [5]
    assert moe_layers(moe_every=0) == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n_heads": 4, "n_kv_heads": 3}, r"model.n_kv_heads: n_heads=4 is not a multiple of"),
        ({"d_model": 96, "n_heads": 4, "head_dim": 7}, r"model.head_dim: rope .* even, got 7"),
        ({"d_model": 90, "n_heads": 6}, r"model.head_dim: .* got 15"),  # d / h odd
        ({"d_model": 100, "n_heads": 8}, r"model.n_heads: d_model=100 .* or set model.head_dim"),
        ({"n_layers": 2, "first_dense": 3}, r"model.first_dense: 3 dense layers of n_layers=2"),
        ({"norm": "batchnorm"}, r"model.norm: .*rmsnorm"),
        ({"position": "alibi"}, r"model.position: .*rope"),
        ({"qk_norm": "layer"}, r"model.qk_norm: .*head"),
        ({"n_kv_heads": 0}, r"model.n_kv_heads: must be >= 1"),
        ({"norm_eps": 0.0}, r"model.norm_eps: must be > 0"),
        ({"rope_theta": -1.0}, r"model.rope_theta: must be > 0"),
    ],
)
def test_bad_body_combinations_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields).validate()


def test_odd_heads_work_with_learned_positions_and_head_dim_decouples_the_width():
    ModelConfig(d_model=90, n_heads=6, position="learned").validate()  # no pairs to rotate
    model = MoETransformer(
        ModelConfig(d_model=32, n_heads=4, head_dim=12, n_kv_heads=1, seq_len=8, d_ff=32),
        RouterConfig(),
    )
    assert model.blocks[0].attn.qkv.weight.shape == ((4 + 2) * 12, 32)
    assert model.blocks[0].attn.proj.weight.shape == (32, 4 * 12)
    assert model(torch.zeros(1, 8, dtype=torch.long))[0].shape == (1, 8, 256)


def model_cfg(name: str) -> TrainModelConfig:
    node = OmegaConf.load(f"{CONFIG_DIR}/model/{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainModelConfig), node))


def test_the_default_models_use_the_modern_body_and_published_ones_their_papers():
    modern = {"norm": "rmsnorm", "position": "rope", "activation": "swiglu"}
    for name in ("tiny", "small", "base"):
        cfg = model_cfg(name)
        assert {k: getattr(cfg, k) for k in modern} == modern, name
        assert 1 < cfg.kv_heads < cfg.n_heads, name  # grouped-query attention
    for name in ("switch_base", "switch_c", "switch_xxl"):  # T5: RMSNorm, no position table
        cfg = model_cfg(name)
        assert (cfg.norm, cfg.position, cfg.kv_heads) == ("rmsnorm", "rope", cfg.n_heads), name
    assert model_cfg("switch_c").head_width == 64  # the published d_kv
    for name in ("m6t_1t", "sam_base"):
        cfg = model_cfg(name)
        assert (cfg.norm, cfg.position, cfg.activation) == ("layernorm", "learned", "gelu"), name
    default = compose_cfg().model  # what `moe-train` trains
    assert (default.norm, default.position, default.activation, default.kv_heads) == (
        "rmsnorm", "rope", "swiglu", 2,
    )  # fmt: skip


def test_a_saved_config_without_body_keys_is_the_gpt2_body():
    new = OmegaConf.to_container(OmegaConf.structured(ModelConfig()))
    old = {k: v for k, v in new.items() if k not in LEGACY_BODY}  # as today's main wrote it,
    old["activation"] = "gelu"  # with the activation it had (its default then)
    assert ModelConfig(**with_legacy_body(old)) == replace(ModelConfig(), **LEGACY_BODY)
    assert ModelConfig(**with_legacy_body(new)) == ModelConfig()  # a new config: as written


def test_rmsnorm_normalises_in_float32():
    norm = RMSNorm(8, eps=1e-6).half()
    x = torch.full((2, 8), 300.0, dtype=torch.float16)  # x^2 = 90000 overflows float16
    y = norm(x)
    assert y.dtype == torch.float16 and torch.equal(y, torch.ones_like(y))
