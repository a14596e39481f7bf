"""Run folders and exports written before the body options (GPT-2's body, no body keys in their
config) load as the body they were trained with, never as the new default, and a resume of such
a run with the new default is refused naming the keys. The folders are made here as today's main
writes them: a legacy-body model, its config with the keys main did not have removed."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from moe_train.checkpoint import save_checkpoint
from moe_train.config import TrainConfig
from moe_train.data.tokenizers import ByteTokenizer
from moe_train.inference.export import export_model, from_pretrained
from moe_train.inference.run import load_run
from moe_train.model import LEGACY_BODY, MoETransformer
from moe_train.routing import RouterConfig
from moe_train.training.run_dir import RunFolderError, check_same_config
from tests.helpers.runs import compose_cfg

NEW_KEYS = {"model": set(LEGACY_BODY) - {"activation"}, "router": {"eval_capacity_factor"}}


def as_main_wrote_it(config: dict) -> dict:
    """`config` without the keys today's main does not know (the body and eval capacity)."""
    return {
        group: {k: v for k, v in fields.items() if k not in NEW_KEYS.get(group, ())}
        if isinstance(fields, dict)
        else fields
        for group, fields in config.items()
    }


@pytest.fixture
def legacy_cfg() -> TrainConfig:
    cfg = compose_cfg("model=tiny", "trainer=ci", *(f"model.{k}={v}" for k, v in LEGACY_BODY.items()
                      if v is not None), "model.n_kv_heads=null")  # fmt: skip
    cfg.model.vocab_size = 256
    return cfg


def legacy_model(cfg: TrainConfig) -> MoETransformer:
    model = MoETransformer(cfg.model, cfg.router, seed=cfg.seed)
    with torch.no_grad():  # a "trained" model: not the init any body would draw
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def test_a_run_folder_of_todays_main_loads_as_the_gpt2_body(tmp_path, legacy_cfg):
    model = legacy_model(legacy_cfg)
    saved = as_main_wrote_it(OmegaConf.to_container(OmegaConf.structured(legacy_cfg)))
    assert "norm" not in saved["model"] and "position" not in saved["model"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    save_checkpoint(tmp_path, 10, model, None, {"step": 10})

    run = load_run(tmp_path)
    assert (run.cfg.model.norm, run.cfg.model.position) == ("layernorm", "learned")
    assert run.cfg.router.eval_capacity_factor is None  # eval is dropless now (the new default)
    idx = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        assert torch.equal(run.model(idx)[0], model(idx)[0])

    modern = replace(legacy_cfg, model=replace(legacy_cfg.model, norm="rmsnorm", position="rope"))
    with pytest.raises(RunFolderError, match=r"model.norm: 'layernorm' -> 'rmsnorm'.*position"):
        check_same_config(tmp_path, modern)  # resuming it with the new default body
    check_same_config(tmp_path, legacy_cfg)  # with its own body: fine


def test_an_export_of_todays_main_loads_as_the_gpt2_body(tmp_path, legacy_cfg):
    model = legacy_model(legacy_cfg)
    export_model(model, tmp_path, ByteTokenizer())
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(as_main_wrote_it(config)))
    loaded = from_pretrained(tmp_path)
    assert (loaded.cfg.norm, loaded.cfg.position, loaded.cfg.activation) == (
        "layernorm", "learned", "gelu",
    )  # fmt: skip
    idx = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_a_new_export_names_its_body(tmp_path):
    cfg = compose_cfg("model=tiny", "trainer=ci")
    cfg.model.vocab_size = 256
    export_model(MoETransformer(cfg.model, RouterConfig()), tmp_path, ByteTokenizer())
    model = json.loads((tmp_path / "config.json").read_text())["model"]
    assert (model["norm"], model["position"], model["n_kv_heads"]) == ("rmsnorm", "rope", 2)
    assert from_pretrained(tmp_path).cfg.norm == "rmsnorm"
