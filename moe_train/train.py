"""`moe-train`: train an MoE language model. The whole loop, readable in one sitting.

moe-train                                   # small MoE LM on the embedded default corpus
moe-train router=sam router.top_k=2 model=small trainer.max_steps=500
torchrun --nproc-per-node 4 -m moe_train.train parallel.ep=2
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from .config import CONFIG_DIR, TrainConfig, register_configs
from .engines import Engine
from .metrics import TrainLogger
from .parallel import ParallelState, init_parallel
from .training.batches import BatchPlan
from .training.build import build_engine, build_model, open_training_data
from .training.cadence import Every
from .training.checkpointer import Checkpointer
from .training.evaluation import Evaluator, evaluate
from .training.optim import autocast_dtype, build_optimizer, lr_at
from .training.state import TrainState
from .training.step import lm_loss, train_step

__all__ = [
    "autocast_dtype", "build_model", "build_optimizer", "evaluate", "lm_loss", "lr_at", "main",
    "train", "train_step",
]  # fmt: skip


def train(cfg: TrainConfig) -> dict:
    """Train from config; returns the run summary. Resumes from run_dir when it can."""
    cfg.validate()
    num_experts = cfg.router.num_experts_for(cfg.model.num_experts)
    parallel = init_parallel(cfg.parallel, num_experts, cfg.router)
    trainer, run_dir = cfg.trainer, Path(cfg.trainer.run_dir)
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    micro, accum = trainer.batch_split(parallel.data_world)
    data_dir, train_tokens, val_tokens = open_training_data(cfg)
    engine = build_engine(cfg, parallel, micro, accum)
    plan = BatchPlan(
        cfg.seed, trainer.global_batch_size, cfg.model.seq_len, micro, accum,
        parallel.data_rank, parallel.data_world, parallel.device,
    )  # fmt: skip

    train_state = TrainState()
    ckpt_cadence = Every(trainer.ckpt_every, trainer.max_steps)
    checkpointer = Checkpointer(run_dir, ckpt_cadence, keep=trainer.keep_checkpoints)
    if trainer.resume:
        checkpointer.restore(train_state, engine)
    logger = TrainLogger(
        run_dir, Every(trainer.log_every, trainer.max_steps), start=train_state.step,
        tokens_per_step=trainer.global_batch_size * cfg.model.seq_len,
        mean_over_ranks=parallel.all_reduce_mean, device=parallel.device,
        is_main=parallel.is_main, tensorboard=trainer.tensorboard, progress=trainer.progress,
        max_over_ranks=parallel.all_reduce_max,
    )  # fmt: skip
    evaluator = Evaluator(
        val_tokens, plan, Every(trainer.eval_every, trainer.max_steps, bool(trainer.eval_batches)),
        max_batches=trainer.eval_batches, mean_over_ranks=parallel.all_reduce_mean,
        writer=logger.writer, echo=parallel.is_main and not trainer.progress,
    )  # fmt: skip
    if parallel.is_main:
        _announce(cfg, parallel, engine, plan, data_dir, train_state.step)

    for step in range(train_state.step, trainer.max_steps):
        lr = lr_at(step, cfg.optim, trainer.max_steps)
        out = train_step(engine, train_tokens, plan, step, lr, rank=parallel.rank)
        train_state.finish_step(out.applied)
        logger.after_step(train_state, out, engine)
        evaluator.after_step(train_state, engine)
        checkpointer.after_step(train_state, engine)
    checkpointer.close(engine)
    logger.close()

    if parallel.is_main:
        print(
            f"done: {train_state.step} steps, train loss {train_state.last_loss:.4f}, best val "
            f"loss {train_state.best_val:.4f}, {train_state.skipped} skipped steps, run folder "
            f"{run_dir}"
        )
    parallel.shutdown()
    return train_state.summary()


def _announce(
    cfg: TrainConfig,
    parallel: ParallelState,
    engine: Engine,
    plan: BatchPlan,
    data_dir: Path,
    start: int,
) -> None:
    """Rank 0: save the composed config into the run folder and print what is about to run."""
    OmegaConf.save(OmegaConf.structured(cfg), Path(cfg.trainer.run_dir) / "config.yaml")
    params = engine.module.num_params()
    print(
        f"moe-train: {cfg.router.kind} router, {params['total'] / 1e6:.2f}M params on this rank "
        f"({params['expert'] / 1e6:.2f}M expert), world {parallel.world_size} (ep {parallel.ep} x "
        f"dp {parallel.dp}), {plan.micro}x{plan.grad_accum} sequences per rank per step, device "
        f"{parallel.device}, data {data_dir}" + (f", resumed at step {start}" if start else "")
    )


register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base=None)
def _hydra_main(dcfg: DictConfig) -> None:
    cfg: TrainConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    train(cfg)


def main() -> None:
    """Console script `moe-train`."""
    _hydra_main()


if __name__ == "__main__":
    main()
