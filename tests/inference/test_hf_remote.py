"""`moe-train-export --format hf-remote`: transformers loads the folder with moe-train's own
modeling file (trust_remote_code=True, moe-train not imported) and computes our eval logits in
fp32, for the routers no stock class holds (sam, prototype, tree) and the others, on both bodies;
generate() decodes greedily as our model does; Expert Choice is refused; the read-back catches a
removed, renamed, duplicated or swapped expert tensor by name."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import field, make_dataclass, replace
from pathlib import Path

import pytest
import torch

from moe_train.data.tokenizers import ByteTokenizer
from moe_train.inference.generate import generate
from moe_train.inference.hf.arch import HFExportError
from moe_train.inference.hf.conversion import ConversionError
from moe_train.inference.hf.export import WEIGHTS
from moe_train.inference.hf.remote import MODELING, export_hf_remote, our_state, verify_remote
from moe_train.model import MoETransformer
from moe_train.routing import RouterConfig
from tests.inference.hf_cases import BASE, lm_eval_and_ours, max_rel, perturbed

transformers = pytest.importorskip("transformers")

GPT2 = replace(BASE, norm="layernorm", position="learned", activation="gelu", n_kv_heads=None,
               head_dim=None, norm_eps=1e-5)  # fmt: skip
SAM = RouterConfig(kind="sam", top_k=2, num_groups=2)
PROTOTYPE = RouterConfig(kind="prototype", top_k=2)
TREE = RouterConfig(kind="tree", tree_depth=2)
MODERN_TOPK = RouterConfig(
    kind="topk", top_k=2, score="sigmoid", num_groups=2, topk_groups=1, bias_update_rate=0.01,
    route_scale=2.5,
)  # fmt: skip

# name -> (model config, router config): every router kind the modeling file computes, on the
# modern body (with what each adds: dense layers, qk-norm, tied head, shared experts) and GPT-2's
CASES = {
    "sam": (BASE, SAM),
    "prototype": (replace(BASE, n_layers=3, moe_every=2, first_dense=1), PROTOTYPE),
    "tree": (replace(BASE, qk_norm="head", tie_embeddings=True), TREE),
    "sam-gpt2": (replace(GPT2, shared_experts=1, shared_d_ff=8), SAM),
    "prototype-gpt2": (replace(GPT2, tie_embeddings=True), PROTOTYPE),
    "tree-gpt2": (GPT2, TREE),
    "tree-sigmoid-shared": (
        replace(BASE, shared_experts=2, shared_d_ff=8, shared_gate=True),
        replace(TREE, tree_gate="sigmoid"),
    ),
    "topk-sigmoid-groups-bias": (BASE, MODERN_TOPK),
    "switch": (replace(BASE, shared_experts=1), RouterConfig(kind="switch")),
}


def tiny(name: str, seed: int = 0) -> MoETransformer:
    cfg, router = CASES[name]
    torch.manual_seed(seed)
    model = perturbed(MoETransformer(cfg, router, seed=seed), seed)
    g = torch.Generator().manual_seed(seed + 1)
    for layer in model.moe_layers():  # a balancing bias that changes choices
        if layer.router.score_bias is not None:
            layer.router.score_bias.copy_(torch.randn(layer.num_experts, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (our model, its hf-remote folder)."""
    out = {}
    for name in CASES:
        model = tiny(name)
        folder = tmp_path_factory.mktemp(name)
        export_hf_remote(model, folder, ByteTokenizer())
        out[name] = (model, folder)
    return out


def load(folder: Path, impl: str = "sdpa"):
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32, attn_implementation=impl,
        output_loading_info=True,
    )  # fmt: skip
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    return hf.eval()


IDX = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(CASES))
def test_the_remote_class_computes_our_logits(exported, name, impl):
    model, folder = exported[name]
    hf = load(folder, impl)
    assert type(hf).__name__ == "MoETrainForCausalLM"
    with torch.no_grad():
        ours, theirs = model(IDX)[0], hf(IDX).logits
    assert max_rel(theirs, ours) < 1e-5


@pytest.mark.parametrize(
    "name", ["sam", "prototype", "tree", "tree-gpt2", "topk-sigmoid-groups-bias"]
)
def test_generate_decodes_greedily_as_our_model(exported, name):
    """HF's generate (KV cache: RoPE / learned positions at the cached offset) = our cached
    generator = an argmax loop over full forwards."""
    model, folder = exported[name]
    hf = load(folder)
    prompt = IDX[:, :5]
    got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                      do_sample=False)  # fmt: skip
    ours = generate(model, prompt, 8, temperature=0.0)
    x = prompt
    with torch.no_grad():
        for _ in range(8):
            x = torch.cat([x, model(x)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours, x)
    assert torch.equal(got, x)


@pytest.mark.parametrize("name", ["sam", "tree-gpt2"])
def test_a_left_padded_batch_generates_as_each_row_alone(exported, name):
    _, folder = exported[name]
    hf = load(folder)
    a, b = IDX[0, :4], IDX[1, :7]
    ids = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), a]), b])
    mask = torch.tensor([[0] * 3 + [1] * 4, [1] * 7])
    both = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row, (prompt, pad) in enumerate(((a, 3), (b, 0))):
        alone = hf.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=5, do_sample=False)  # fmt: skip
        assert torch.equal(both[row, pad:], alone[0])


def test_the_cache_gives_the_full_forwards_logits(exported):
    """Prefill 20 tokens, then 12 more in chunks of 5, 1, 6 through the cache: the logits of a
    full forward over all 32."""
    _, folder = exported["sam-gpt2"]
    hf = load(folder)
    with torch.no_grad():
        full = hf(IDX).logits
        out = hf(IDX[:, :20], use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        parts = [out.logits]
        for a, b in ((20, 25), (25, 26), (26, 32)):
            out = hf(IDX[:, a:b], use_cache=True, cache=cache)
            parts.append(out.logits)
    assert max_rel(torch.cat(parts, dim=1), full) < 1e-5


LOAD_ALONE = textwrap.dedent(
    """
    import sys
    sys.modules["moe_train"] = None  # any import of moe_train fails from here on
    import torch, transformers
    folder, idx_file, out_file = sys.argv[1:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.save(hf(torch.load(idx_file)).logits, out_file)
    hf.generate(torch.load(idx_file)[:, :4], max_new_tokens=3, do_sample=False)
    assert not any(m.startswith("moe_train.") for m in sys.modules), "moe_train imported"
    """
)


def test_loading_imports_no_moe_train(exported, monkeypatch):
    """In this process: any import of moe_train while transformers loads and runs the folder
    fails (the modeling file is transformers' copy, imported by transformers)."""
    import builtins

    model, folder = exported["prototype-gpt2"]
    real = builtins.__import__

    def guarded(name, globals=None, locals=None, fromlist=(), level=0):
        package = (globals or {}).get("__package__") or ""
        if name.split(".")[0] == "moe_train" or (level and package.startswith("moe_train")):
            raise ImportError(f"moe_train imported while loading the export: {name}")
        return real(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", guarded)
    hf = load(folder)
    with torch.no_grad():
        theirs = hf(IDX).logits
    hf.generate(IDX[:, :4], attention_mask=torch.ones_like(IDX[:, :4]), max_new_tokens=3,
                do_sample=False)  # fmt: skip
    monkeypatch.undo()
    with torch.no_grad():
        assert max_rel(theirs, model(IDX)[0]) < 1e-5


@pytest.mark.slow
def test_loading_needs_no_moe_train(exported, tmp_path):
    """In a fresh process where `import moe_train` fails."""
    model, folder = exported["tree"]
    torch.save(IDX, tmp_path / "idx.pt")
    subprocess.run(
        [sys.executable, "-c", LOAD_ALONE, str(folder), str(tmp_path / "idx.pt"),
         str(tmp_path / "logits.pt")],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    with torch.no_grad():
        assert max_rel(torch.load(tmp_path / "logits.pt"), model(IDX)[0]) < 1e-5
    copied = (folder / MODELING).read_text()
    assert "moe_train" not in [line.split()[1] for line in copied.splitlines()
                               if line.startswith(("import ", "from "))]  # fmt: skip


def test_config_json_names_the_remote_classes(exported):
    _, folder = exported["sam"]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moe_train.MoETrainForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "modeling_moe_train.MoETrainConfig"
    assert config["architectures"] == ["MoETrainForCausalLM"]
    assert config["router_kind"] == "sam" and config["num_experts_per_tok"] == 2
    assert config["eos_token_id"] == ByteTokenizer.eot_id
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok("héllo")["input_ids"] == ByteTokenizer().encode("héllo").tolist()


@pytest.mark.parametrize(
    ("model_cfg", "router", "message"),
    [
        (BASE, RouterConfig(kind="expert_choice", capacity_factor=2.0),
         r"router.kind='expert_choice': Expert Choice is not causal.*--format moe-train"),
        (BASE, replace(SAM, eval_capacity_factor=1.0), "eval_capacity_factor=1.0: capacity"),
    ],
    ids=["expert_choice", "eval-capacity"],
)  # fmt: skip
def test_what_the_modeling_file_does_not_compute_is_refused(tmp_path, model_cfg, router, message):
    model = MoETransformer(model_cfg, router).eval()
    with pytest.raises(HFExportError, match=message):
        export_hf_remote(model, tmp_path, ByteTokenizer())
    assert not (tmp_path / WEIGHTS).exists()  # refused before anything is written


def test_an_option_added_later_is_refused_not_dropped(tmp_path):
    Later = make_dataclass(
        "Later", [("score_func", str, field(default="softmax"))], bases=(RouterConfig,)
    )
    model = MoETransformer(BASE, Later(kind="sam", top_k=2, num_groups=2, score_func="x"))
    with pytest.raises(HFExportError, match="router.score_func='x': modeling_moe_train.py does"):
        export_hf_remote(model, tmp_path, ByteTokenizer())


W_IN = "model.blocks.0.ffn.experts.w_in"


def _swap(t):
    t[W_IN] = t[W_IN][[1, 0, 2, 3]].contiguous()


def _duplicate(t):
    t[W_IN] = t[W_IN].clone()
    t[W_IN][1] = t[W_IN][0]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop(W_IN), r"missing \['" + W_IN),
        (lambda t: t.update({W_IN.replace("blocks.0", "blocks.7"): t.pop(W_IN)}),
         r"missing \['" + W_IN + r"'\], extra \['model.blocks.7"),
        (_duplicate, W_IN + r"\[expert 1\] does not hold"),
        (_swap, W_IN + r"\[expert 0\] does not hold"),
        (lambda t: t.update({W_IN: t[W_IN][:3].contiguous()}), W_IN + r" has shape \[3, "),
    ],
    ids=["removed", "renamed", "duplicated", "swapped", "one-expert-cut"],
)  # fmt: skip
def test_the_read_back_catches_a_tampered_expert_tensor(exported, edit, message):
    from safetensors.torch import load_file, save_file

    model, folder = exported["sam"]
    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / "tampered.safetensors"))
    copy = folder.parent / (folder.name + "-tampered")
    copy.mkdir(exist_ok=True)
    for f in folder.iterdir():
        if f.is_file() and f.name != "tampered.safetensors":
            (copy / f.name).write_bytes(f.read_bytes())
    (copy / WEIGHTS).write_bytes((folder / "tampered.safetensors").read_bytes())
    (folder / "tampered.safetensors").unlink()
    with pytest.raises(ConversionError, match=message):
        verify_remote(copy, our_state(model))
    verify_remote(folder, our_state(model))  # the untouched folder passes


def test_a_config_json_that_builds_other_tensors_is_caught(exported, tmp_path):
    model, folder = exported["prototype"]
    for f in folder.iterdir():
        if f.is_file():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["moe_every"] = 1  # layer 2 would be an MoE layer too
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="builds other tensors from config.json"):
        verify_remote(tmp_path, our_state(model))


def test_export_from_a_trained_run_through_the_cli(tiny_run, tmp_path, capsys):
    from moe_train.inference.export import main
    from moe_train.inference.run import load_run

    assert main([str(tiny_run), "--out", str(tmp_path), "--format", "hf-remote"]) == 0
    assert "every tensor read back" in capsys.readouterr().out
    run = load_run(tiny_run)
    hf = load(tmp_path)
    idx = torch.randint(
        0, 256, (2, run.cfg.model.seq_len), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        assert max_rel(hf(idx).logits, run.model(idx)[0]) < 1e-5
    with pytest.raises(SystemExit):  # --arch chooses a stock class: --format hf only
        main([str(tiny_run), "--out", str(tmp_path), "--format", "hf-remote", "--arch", "mixtral"])
    assert "goes with --format hf only" in capsys.readouterr().err


@pytest.mark.slow
def test_lm_eval_scores_the_remote_export(tmp_path, monkeypatch):
    """lm-evaluation-harness with trust_remote_code=True on docs/lm_eval's local task: its
    accuracy is the one our SAM model's own log-likelihoods give. Skipped without lm-eval."""
    model = perturbed(MoETransformer(replace(BASE, seq_len=64, tie_embeddings=True), SAM))
    export_hf_remote(model, tmp_path / "hf", ByteTokenizer())
    acc, ours = lm_eval_and_ours(model, tmp_path / "hf", monkeypatch, ",trust_remote_code=True")
    assert acc == pytest.approx(ours)
