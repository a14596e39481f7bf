"""Shared experts (model.shared_experts) in and out of Qwen2-MoE's shared_expert +
shared_expert_gate, through the same checked conversion: transformers computes our logits (fp32)
for a gated and an ungated model (a zero gate, sigmoid(0) = 1/2, and down_proj = 2 w_out), an
imported Qwen2-MoE with a shared expert computes transformers' logits, and a missing or
duplicated shared-expert tensor fails by name."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moe_train.data.tokenizers import ByteTokenizer
from moe_train.inference.hf.arch import FAMILIES, HFExportError, choose, conversion, our_shapes
from moe_train.inference.hf.conversion import ConversionError
from moe_train.inference.hf.export import WEIGHTS, export_hf, our_tensor, verify_folder
from moe_train.inference.hf.load import HFImportError
from moe_train.model import MoETransformer
from tests.inference.hf_cases import BASE, SWITCH, TOPK, perturbed
from tests.inference.test_hf_import import COMMON, logits_match, ours_from

transformers = pytest.importorskip("transformers")

# 3 layers, the first dense; 2 shared experts of width 8 (H = 16); the raw top-2 probabilities
SHARED = replace(
    BASE, n_layers=3, moe_every=1, first_dense=1, shared_experts=2, shared_d_ff=8, shared_gate=True
)
RAW_TOP2 = replace(TOPK, normalize_topk=False)
L1 = "model.layers.1.mlp."


def _hf_logits_of_export(model: MoETransformer, folder) -> float:
    fam, _ = export_hf(model, folder, ByteTokenizer())
    assert fam.name == "qwen2_moe"
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert hf.config.shared_expert_intermediate_size == 16
    return logits_match(hf.eval(), model)


@pytest.mark.parametrize(
    ("gate", "router"), [(True, RAW_TOP2), (False, SWITCH)], ids=["gated-topk", "ungated-switch"]
)
def test_qwen2_moe_computes_our_shared_experts(tmp_path, gate, router):
    model = perturbed(MoETransformer(replace(SHARED, shared_gate=gate), router, seed=0))
    assert _hf_logits_of_export(model, tmp_path) < 1e-5
    if not gate:  # the exact equivalent: a zero gate, down_proj twice w_out
        from safetensors.torch import load_file

        t = load_file(str(tmp_path / WEIGHTS))
        assert torch.equal(t[L1 + "shared_expert_gate.weight"], torch.zeros(1, 32))
        w_out = model.state_dict()["blocks.1.ffn.shared.w_out"]
        assert torch.equal(t[L1 + "shared_expert.down_proj.weight"], 2 * w_out)


def test_an_imported_shared_expert_computes_transformers_logits(tmp_path):
    config = transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=False, qkv_bias=False,
        shared_expert_intermediate_size=16, mlp_only_layers=[0],
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    ours = ours_from(tmp_path / "hf")
    assert (ours.cfg.shared_experts, ours.cfg.shared_width, ours.cfg.shared_gate) == (1, 16, True)
    assert (ours.router_cfg.kind, ours.router_cfg.normalize_topk) == ("topk", False)
    assert logits_match(hf, ours) < 1e-5
    assert _hf_logits_of_export(ours, tmp_path / "back") < 1e-5  # and back out

    from safetensors.torch import load_file, save_file

    gone = L1 + "shared_expert.down_proj.weight"
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    tensors.pop(gone)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(HFImportError, match=r"missing \['" + gone.replace(".", r"\.")):
        ours_from(tmp_path / "hf")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop(L1 + "shared_expert_gate.weight"), r"missing \['.*shared_expert_gate"),
        (
            lambda t: t.update({L1 + "shared_expert.up_proj.weight": t[L1 + "shared_expert.gate_proj.weight"].clone()}),
            r"shared_expert\.up_proj\.weight does not hold blocks\.1\.ffn\.shared\.w_in",
        ),
    ],
    ids=["removed", "duplicated"],
)  # fmt: skip
def test_a_missing_or_duplicated_shared_tensor_fails_the_read_back_by_name(tmp_path, edit, message):
    from safetensors.torch import load_file, save_file

    model = perturbed(MoETransformer(SHARED, SWITCH, seed=1))
    fam, _ = export_hf(model, tmp_path, ByteTokenizer())
    tensors = load_file(str(tmp_path / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(tmp_path / WEIGHTS))
    state = {k: v.float() for k, v in model.state_dict().items()}
    with pytest.raises(ConversionError, match=message):
        verify_folder(tmp_path, conversion(fam, model.cfg, model.router_cfg), our_tensor(state))


def test_the_shared_pieces_are_checked_and_other_classes_refuse_shared_experts():
    conv = conversion(FAMILIES["qwen2_moe"], SHARED, SWITCH)
    shapes = our_shapes(SHARED, SWITCH)
    up = [p for p in conv.pieces if p.hf == L1 + "shared_expert.up_proj.weight"][0]
    conv.pieces.remove(up)
    with pytest.raises(ConversionError, match=r"shared\.w_in \[32, 32\] cover 512 of its 1024"):
        conv.check(shapes)
    conv.pieces += [up, up]
    with pytest.raises(ConversionError, match=r"shared_expert\.up_proj\.weight would be produced"):
        conv.check(shapes)
    for arch in ("mixtral", "qwen3_moe"):
        cfg = replace(SHARED, qk_norm="head") if arch == "qwen3_moe" else SHARED
        with pytest.raises(HFExportError, match="model.shared_experts=2: .* has no shared"):
            choose(cfg, TOPK, arch)
    with pytest.raises(HFExportError, match="normalize_topk=False: MixtralForCausalLM always"):
        choose(BASE, RAW_TOP2, "mixtral")
    assert choose(SHARED, TOPK).name == "qwen2_moe"  # auto: the one class that holds them
