"""`moe-train-export --format hf`: stock transformers classes load the folder with no custom code
and compute our logits (fp32); the byte tokenizer encodes as ours; the bijection check catches a
missing, extra, duplicated or swapped expert; what no class holds is refused by name."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from moe_train.data.tokenizers import ByteTokenizer
from moe_train.inference.hf.arch import FAMILIES, HFExportError, choose, conversion, our_shapes
from moe_train.inference.hf.conversion import ConversionError, Ref
from moe_train.inference.hf.export import WEIGHTS, export_hf, our_tensor, verify_folder
from moe_train.model import MoETransformer
from moe_train.routing import RouterConfig
from tests.inference.hf_cases import (
    BASE,
    CASES,
    SWITCH,
    TOPK,
    lm_eval_and_ours,
    max_rel,
    perturbed,
    tiny_model,
)

transformers = pytest.importorskip("transformers")

TEXT = "héllo wörld, 日本語 Ā \x00 tabs\tand\nnewlines <0x41> ünïcödé"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (our model, its export folder), one export per family."""
    out = {}
    for fam in CASES:
        model = tiny_model(fam)
        folder = tmp_path_factory.mktemp(fam)
        got, _ = export_hf(model, folder, ByteTokenizer())
        assert got.name == fam  # chosen automatically from the router and body
        out[fam] = (model, folder)
    return out


@pytest.mark.parametrize("fam", list(CASES))
def test_a_stock_class_loads_the_export_and_computes_our_logits(exported, fam):
    model, folder = exported[fam]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    assert type(hf).__name__ == FAMILIES[fam].architecture
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf.eval()(idx).logits
    assert max_rel(theirs, ours) < 1e-5


def test_the_byte_tokenizer_encodes_as_ours_and_generate_runs(exported):
    _, folder = exported["qwen2_moe"]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = ByteTokenizer().encode(TEXT).tolist()
    assert tok(TEXT)["input_ids"] == ids
    assert tok.decode(ids) == TEXT
    assert (
        tok.eos_token_id
        == ByteTokenizer.eot_id
        == json.loads((folder / "config.json").read_text())["eos_token_id"]
    )
    pipe = transformers.pipeline("text-generation", model=str(folder), dtype=torch.float32)
    text = pipe("hello", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("hello") and len(text.encode()) >= len("hello")


def test_a_bpe_tokenizer_travels_with_its_ids(tmp_path):
    from moe_train.data.tokenizers import train_bpe

    bpe = train_bpe(["the quick brown fox jumps over the lazy dog " * 20, TEXT], vocab_size=300)
    model = MoETransformer(replace(BASE, vocab_size=320), TOPK).eval()
    export_hf(model, tmp_path, bpe)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok(TEXT)["input_ids"] == bpe.encode(TEXT).tolist()
    assert tok.eos_token_id == bpe.eot_id
    small = MoETransformer(replace(BASE, vocab_size=256), TOPK).eval()
    with pytest.raises(HFExportError, match="300 tokens, more than model.vocab_size=256"):
        export_hf(small, tmp_path / "small", bpe)


def _rewrite(folder, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS))


E0 = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
E1 = "model.layers.0.block_sparse_moe.experts.1.w1.weight"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.update({E0: t[E1], E1: t[E0]}), E0 + r" does not hold .*expert 0"),
        (lambda t: t.update({E1: t[E0].clone()}), E1 + r" does not hold .*expert 1"),
        (lambda t: t.pop(E1), r"missing \['" + E1),
        (lambda t: t.update({E1.replace(".1.", ".9."): t.pop(E1)}), "extra"),
    ],
    ids=["swapped", "duplicated", "removed", "renamed"],
)
def test_the_read_back_catches_a_swapped_duplicated_removed_or_renamed_expert(
    exported, tmp_path, edit, message
):
    model, _ = exported["mixtral"]
    fam, _ = export_hf(model, tmp_path, ByteTokenizer())
    _rewrite(tmp_path, edit)
    state = {k: v.float() for k, v in model.state_dict().items()}
    with pytest.raises(ConversionError, match=message):
        verify_folder(tmp_path, conversion(fam, model.cfg, model.router_cfg), our_tensor(state))


def test_the_conversion_is_checked_to_be_a_bijection():
    cfg, router = CASES["mixtral"]
    conv = conversion(FAMILIES["mixtral"], cfg, router)
    shapes = our_shapes(cfg, router)
    dup = conv.pieces[-1]
    conv.pieces.append(dup)
    with pytest.raises(ConversionError, match="produced twice"):
        conv.check(shapes)
    conv.pieces.pop()
    gone = [p for p in conv.pieces if p.ref == Ref("blocks.1.ffn.experts.w_in", 3)][0]
    conv.pieces.remove(gone)
    with pytest.raises(ConversionError, match=r"experts.w_in\[expert 3\] .* cover 768 of its 1536"):
        conv.check(shapes)


@pytest.mark.parametrize(
    ("model_cfg", "router", "arch", "message"),
    [
        (BASE, RouterConfig(kind="sam", top_k=2, num_groups=2), None, "router.kind='sam'.*hf-remote"),
        (BASE, RouterConfig(kind="expert_choice", capacity_factor=2.0), None, "not causal"),
        (replace(BASE, norm="layernorm", position="learned", activation="gelu"), TOPK, None,
         "model.norm='layernorm'"),
        (BASE, replace(TOPK, eval_capacity_factor=1.0), None, "eval_capacity_factor=1.0: capacity"),
        (BASE, SWITCH, "mixtral", "router.kind='switch': MixtralForCausalLM routes topk only"),
        (replace(BASE, qk_norm="head"), TOPK, "mixtral", "model.qk_norm='head'"),
        (BASE, TOPK, "olmoe", "OLMoE normalises q and k over the whole projection"),
        (replace(BASE, moe_every=2), TOPK, "mixtral", "MoE FFN in every layer"),
    ],
    ids=["sam", "expert_choice", "gpt2-body", "eval-capacity", "switch-on-mixtral",
         "qk-norm-on-mixtral", "olmoe", "dense-layers-on-mixtral"],
)  # fmt: skip
def test_what_no_stock_class_holds_is_refused_by_name(model_cfg, router, arch, message):
    with pytest.raises(HFExportError, match=message):
        choose(model_cfg, router, arch)


def test_a_router_option_no_family_maps_is_refused_not_dropped(monkeypatch):
    """A field added to RouterConfig later (a routing option) with a non-default value."""
    from dataclasses import field, make_dataclass

    Later = make_dataclass(
        "Later", [("score_func", str, field(default="softmax"))], bases=(RouterConfig,)
    )
    with pytest.raises(HFExportError, match="router.score_func='sigmoid': no Hugging Face class"):
        choose(BASE, Later(kind="topk", top_k=2, score_func="sigmoid"))
    assert choose(BASE, Later(kind="topk", top_k=2)).name == "mixtral"  # at its default: fine


def test_export_from_a_trained_run_through_the_cli(tiny_run, tmp_path, capsys):
    from moe_train.inference.export import main
    from moe_train.inference.run import load_run

    assert main([str(tiny_run), "--out", str(tmp_path), "--format", "hf"]) == 0
    assert "every tensor read back" in capsys.readouterr().out
    run = load_run(tiny_run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    idx = torch.randint(
        0, 256, (2, run.cfg.model.seq_len), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        assert max_rel(hf(idx).logits, run.model(idx)[0]) < 1e-5


@pytest.mark.slow
def test_lm_eval_scores_the_export_as_our_model_does(tmp_path, monkeypatch):
    """lm-evaluation-harness on docs/lm_eval's local task (no download): its accuracy is the one
    our model's own log-likelihoods give. Skipped without lm-eval (`pip install -e ".[eval]"`)."""
    model = perturbed(MoETransformer(replace(BASE, seq_len=64, tie_embeddings=True), SWITCH))
    export_hf(model, tmp_path / "hf", ByteTokenizer())  # seq_len 64: no question is cut
    acc, ours = lm_eval_and_ours(model, tmp_path / "hf", monkeypatch)
    assert acc == pytest.approx(ours)
