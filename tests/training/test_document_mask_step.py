"""data.document_mask reaches the model: the train step and validation hand each micro-batch's
document positions to it."""

from __future__ import annotations

import torch

from moe_train.data import DataConfig, open_data, prepare_corpus
from moe_train.data.sampler import val_batches, val_positions
from moe_train.training.batches import BatchPlan
from moe_train.training.evaluation import evaluate
from moe_train.training.step import lm_loss, train_step
from tests.helpers.corpora import write_jsonl
from tests.helpers.training import SEQ_LEN, engine_and_plan, small_cfg


def test_the_step_and_validation_give_the_model_its_document_positions(tmp_path):
    rows = [{"text": "xy" * n} for n in (3, 9, 1, 14, 5, 7, 2, 11) * 12]  # short documents
    write_jsonl(tmp_path / "in" / "d.jsonl", rows)
    prepare_corpus([str(tmp_path / "in")], tmp_path / "out", progress=False, val_fraction=0.3)
    data = open_data(DataConfig(dir=str(tmp_path / "out"), document_mask=True))
    val = data.first.val
    cfg = small_cfg()
    cfg.model.vocab_size = 256
    results = {}
    for masked in (False, True):
        engine, _ = engine_and_plan(cfg)  # the same initial model each time
        plan = BatchPlan(cfg.seed, 4, SEQ_LEN, 2, 2, 0, 1, torch.device("cpu"), masked)
        val_loss = evaluate(engine, val, plan, 2, lambda t: t)
        step_loss = float(train_step(engine, data, plan, 0, 1e-3, rank=0).loss)
        results[masked] = (val_loss, step_loss)
    engine, _ = engine_and_plan(cfg)
    engine.model.eval()
    with torch.no_grad():  # validation with the mask = the model given the positions
        want = torch.stack([
            lm_loss(engine.model, x, y, engine.autocast, None, pos)[0]
            for (x, y), pos in zip(val_batches(val, SEQ_LEN, 4, 2), val_positions(val, SEQ_LEN, 4, 2))
        ]).mean()  # fmt: skip
    assert results[True][0] == float(want)
    assert results[True][0] != results[False][0]  # documents inside windows: the mask matters
    assert results[True][1] != results[False][1]
