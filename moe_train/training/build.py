"""From config to the things the loop runs on: the token files, the model and its engine.

The only places that build the model (`build_meta_model`, `build_model`) and wrap it for its
engine (`build_engine`: moe_train.parallel.parallelize for the native engine, which chooses the
gradient strategy and when to materialise; deepspeed.initialize for DeepSpeed).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TrainConfig
from ..data import TrainingData, open_data
from ..data.checks import check_split_sizes, check_token_ids, resolve_vocab_size
from ..engines import DeepSpeedEngine, Engine, NativeEngine, deepspeed_initialize
from ..init import materialize
from ..model import MoETransformer
from ..parallel import ParallelState, parallelize
from ..precision import autocast_dtype
from .optim import build_optimizer


def open_training_data(cfg: TrainConfig) -> TrainingData:
    """The sources of cfg.data (one, or a mixture), checked before any step: sets
    cfg.model.vocab_size when null (the data's, rounded up to a multiple of 64), and fails
    naming the file when a token id is outside it or a split is too small for one window (val,
    when evaluated: one batch)."""
    data = open_data(cfg.data, cfg.model.vocab_size)
    cfg.model.vocab_size = resolve_vocab_size(cfg.model.vocab_size, data.first)
    check_token_ids(data.sources, cfg.model.vocab_size)
    for s in data.sources:
        evaluated = s.val if cfg.trainer.eval_batches else None
        name = s.name if data.is_mixture else ""
        check_split_sizes(
            s.train, evaluated, cfg.model.seq_len, cfg.trainer.global_batch_size, name
        )
    if cfg.trainer.eval_batches and not data.validation():
        from ..data import DataError

        raise DataError(
            f"no validation data in {', '.join(str(s.path) for s in data.sources)} (data.holdout=0?); "
            "set data.holdout > 0 or trainer.eval_batches=0 to train without validation"
        )
    return data


def build_meta_model(cfg: TrainConfig, parallel: ParallelState) -> MoETransformer:
    """This rank's model (its share of the experts) on `meta`: shapes only, no memory, no group."""
    with torch.device("meta"):
        return MoETransformer(
            cfg.model, cfg.router, seed=cfg.seed, shard=parallel.dims.expert_shard
        )


def build_model(cfg: TrainConfig, parallel: ParallelState) -> MoETransformer:
    """This rank's model on its device, initialised (moe_train.init: every parameter from
    (cfg.seed, its name), experts by global id; the same model in any layout). Unsharded."""
    return materialize(build_meta_model(cfg, parallel), parallel.device, cfg.seed)


def init_weights(module: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """Materialise this rank's (possibly FSDP-sharded) parameters by moe_train.init, then, with
    model.init_from, overwrite every one from the Hugging Face folder (each rank reads its boxes
    only: moe_train/inference/hf/load.py)."""
    materialize(module, device, cfg.seed)
    folder = getattr(cfg.model, "init_from", None)  # a bare ModelConfig (tests) has none
    if folder:
        from ..inference.hf.load import load_into

        load_into(module, folder)


def build_engine(
    cfg: TrainConfig, parallel: ParallelState, micro_batch: int, grad_accum: int
) -> Engine:
    """The model, its optimizer and the engine of trainer.engine around them."""
    module = build_meta_model(cfg, parallel)
    amp_dtype = autocast_dtype(cfg.trainer.precision, parallel.device)
    if cfg.trainer.engine == "deepspeed":  # DeepSpeed broadcasts, reduces and steps itself
        init_weights(module, cfg, parallel.device)  # replicated (no parallel.fsdp here)
        optimizer = build_optimizer(module, cfg.optim, parallel.device)
        wrapped = deepspeed_initialize(
            module, optimizer, parallel, num_experts=cfg.model.num_experts,
            micro_batch=micro_batch, grad_accum=grad_accum, zero_stage=cfg.trainer.zero_stage,
            grad_clip=cfg.optim.grad_clip, amp_dtype=amp_dtype,
        )  # fmt: skip
        return DeepSpeedEngine(wrapped, module, optimizer, parallel)
    # groups into the MoE layers, recomputation, then materialise + DDP (or FSDP shards on meta,
    # then materialise the local shards): parallelize knows the order and returns the strategy
    grad_sync = parallelize(
        module, parallel.dims, parallel.groups, cfg.parallel,
        activation_checkpointing=cfg.trainer.activation_checkpointing,
        compile=cfg.trainer.compile, param_dtype=amp_dtype, device_type=parallel.device.type,
        materialize=lambda m: init_weights(m, cfg, parallel.device),
    )  # fmt: skip
    optimizer = build_optimizer(module, cfg.optim, parallel.device)  # over the local parameters
    return NativeEngine(
        grad_sync, optimizer, parallel,
        grad_accum=grad_accum, grad_clip=cfg.optim.grad_clip, amp_dtype=amp_dtype,
        async_checkpoint=cfg.trainer.async_checkpoint,
    )  # fmt: skip
