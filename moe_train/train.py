"""`moe-train`: train an MoE language model. The whole loop, readable in one sitting.

moe-train                                   # small MoE LM on the embedded default corpus
moe-train router=sam router.top_k=2 model=small trainer.max_steps=500
torchrun --nproc-per-node 4 -m moe_train.train parallel.ep=2
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from . import fault_points
from .config import CONFIG_DIR, TrainConfig, register_configs
from .config_help import PLANNER_OVERRIDE_ERROR, compact_config, planner_override, render_help
from .data import TrainingData
from .engines import Engine
from .metrics import last_logged
from .parallel import ParallelState, init_parallel
from .precision import autocast_dtype
from .training.batches import BatchPlan
from .training.build import build_engine, build_model, open_training_data
from .training.cadence import Every
from .training.checkpointer import Checkpointer
from .training.console import rank_console
from .training.divergence import check_skipped_steps
from .training.evaluation import Evaluator, evaluate
from .training.host_memory import set_host_memory
from .training.init_from import apply_init_from, explicit_fields
from .training.logger import TrainLogger
from .training.optim import build_optimizer, lr_at
from .training.run_dir import RunFolder
from .training.step import lm_loss, train_step
from .training.stop import (
    EXIT_RESUME,
    StopRule,
    StopSignals,
    clear_stopped,
    parse_duration,
    read_save_seconds,
    signal_numbers,
    write_stopped,
)
from .training.train_state import TrainState
from .training.watchdog import Watchdog, enable_flight_recorder

__all__ = [
    "autocast_dtype", "build_model", "build_optimizer", "evaluate", "lm_loss", "lr_at", "main",
    "train", "train_step",
]  # fmt: skip


def train(cfg: TrainConfig) -> dict:
    """Train from config; returns the run summary. Resumes from run_dir when it can.

    Every check that can fail runs before the first step: the config, the layout, the run folder
    (one run at a time, one configuration: training.run_dir), the data, the checkpoint."""
    started = time.perf_counter()  # trainer.time_limit counts from here
    apply_init_from(cfg)  # model.init_from: the fields its config.json fixes
    cfg.validate()
    fault_points.reset()
    if cfg.trainer.stall_timeout_s != 0:
        enable_flight_recorder()
    num_experts = cfg.router.num_experts_for(cfg.model.num_experts)
    parallel = init_parallel(cfg.parallel, num_experts, cfg.router)
    signals = StopSignals(signal_numbers(cfg.trainer.stop_signals), rank=parallel.dims.rank)
    signals.install()
    try:
        with rank_console(parallel.dims.rank):  # ranks > 0: only stderr, each line "[rank r]"
            run_folder = RunFolder.open(cfg, parallel)
            try:
                return _train(cfg, parallel, run_folder, signals, started)
            finally:
                run_folder.close()
    finally:
        signals.restore()


def _train(
    cfg: TrainConfig,
    parallel: ParallelState,
    run_folder: RunFolder,
    signals: StopSignals,
    started: float,
) -> dict:
    trainer, run_dir = cfg.trainer, Path(cfg.trainer.run_dir)
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    set_host_memory(trainer.host_memory)
    dims = parallel.dims  # every rank reads its own slice of the global batch (world-way split)
    micro, accum = trainer.batch_split(dims.world_size)
    data = open_training_data(cfg)
    engine = build_engine(cfg, parallel, micro, accum)
    plan = BatchPlan(
        cfg.seed, trainer.global_batch_size, cfg.model.seq_len, micro, accum,
        dims.rank, dims.world_size, parallel.device, cfg.data.document_mask,
    )  # fmt: skip

    train_state = TrainState()
    ckpt_cadence = Every(trainer.ckpt_every, trainer.max_steps)
    checkpointer = Checkpointer(
        run_dir, ckpt_cadence, keep=trainer.keep_checkpoints, main=dims.is_main
    )
    if not (trainer.resume and checkpointer.restore(train_state, engine)):
        run_folder.start_fresh(trainer.resume)  # rank 0: an earlier run's files go aside, said so
    if dims.is_main:
        clear_stopped(run_dir)  # written again only by a stop of this run
    if train_state.step >= trainer.max_steps:
        return _nothing_to_do(train_state, parallel, run_dir, trainer.max_steps)
    run_folder.record(cfg, data.first.tokenizer_folder, data.first.tokenizer)  # rank 0
    stop = StopRule(
        signals, parallel, started=started, save_s=read_save_seconds(run_dir),
        time_limit_s=parse_duration(trainer.time_limit) if trainer.time_limit else None,
    )  # fmt: skip
    watchdog = Watchdog(
        run_dir, dims.rank, dims.world_size, trainer.stall_timeout_s,
        skip_groups=(parallel.groups.checkpoint,),
    )  # fmt: skip
    if dims.is_main:
        _announce(cfg, parallel, engine, plan, data, train_state.step)
    logger = TrainLogger(cfg, parallel, start=train_state.step)
    evaluator = Evaluator(
        data, plan, Every(trainer.eval_every, trainer.max_steps, bool(trainer.eval_batches)),
        max_batches=trainer.eval_batches, mean_over_ranks=parallel.all_reduce_mean,
        writer=logger.writer, report=logger.report_val,
    )  # fmt: skip

    watchdog.start()
    parallel.barrier()  # the watchdog's folder is clear on every rank before the first step
    stopped = None
    try:
        for step in range(train_state.step, trainer.max_steps):
            with watchdog.phase("step", step):
                fault_points.reached("step", step)
                stop.begin_step()
                lr = lr_at(step, cfg.optim, trainer.max_steps)
                out = train_step(engine, data, plan, step, lr, rank=dims.rank)
                train_state.finish_step(out.applied)
                logger.after_step(train_state, out, engine)
                stop.step_done()
            check_skipped_steps(train_state, trainer.max_skipped_steps, lr)
            with watchdog.phase("eval", step):
                evaluator.after_step(train_state, engine)
            with watchdog.phase("save", step):
                checkpointer.after_step(train_state, engine)
                stopped = stop.check()  # collective: every rank stops at the same step
                if stopped is not None:
                    checkpointer.save_now(train_state, engine)
            if stopped is not None:
                break
            if checkpointer.save_seconds is not None:
                stop.save_done(checkpointer.save_seconds)
        with watchdog.phase("save", train_state.step):
            checkpointer.close(engine)
    finally:
        watchdog.close()
    logger.close()
    seconds = logger.elapsed()

    if stopped is not None and train_state.step < trainer.max_steps:  # at the last: done
        return _stopped(train_state, parallel, run_dir, stopped, seconds)
    if dims.is_main:
        print(
            f"done: {train_state.step} steps in {_duration(seconds)}, train loss "
            f"{train_state.last_loss:.4f}, best val loss {train_state.best_val:.4f}, "
            f"{train_state.skipped} skipped steps, run folder {run_dir}"
        )
    parallel.shutdown()
    return {**train_state.summary(), "seconds": seconds}


def _stopped(
    train_state: TrainState, parallel: ParallelState, run_dir: Path, reason: str, seconds: float
) -> dict:
    """A stop by signal or time limit: the checkpoint of this step is published; say so, leave
    `stopped` in the run folder (rank 0) and return the summary with `stopped` (the reason)."""
    if parallel.dims.is_main:
        write_stopped(run_dir, train_state.step, reason)
        print(
            f"stopped at step {train_state.step} ({reason}) after {_duration(seconds)}: "
            f"checkpoint step_{train_state.step:08d} is saved; run the same command to resume "
            f"(exit status {EXIT_RESUME})",
            flush=True,
        )
    parallel.shutdown()
    return {**train_state.summary(), "seconds": seconds, "stopped": reason}


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s" if minutes else f"{seconds:.1f} s"


def _nothing_to_do(
    train_state: TrainState, parallel: ParallelState, run_dir: Path, max_steps: int
) -> dict:
    """A finished run started again: say what was done, train nothing."""
    is_main = parallel.dims.is_main
    last = last_logged(run_dir, train_state.step) if is_main else {}
    train_state.last_loss = float(last.get("loss", float("nan")))
    if is_main:
        losses = ", ".join(f"{k.replace('_', ' ')} {float(v):.4f}" for k, v in last.items())
        print(
            f"already at step {train_state.step} (trainer.max_steps={max_steps}); nothing to do"
            + (f"; last logged {losses}" if losses else "")
            + f"; run folder {run_dir}. Raise trainer.max_steps to train further"
        )
    parallel.shutdown()
    return train_state.summary()


def _announce(
    cfg: TrainConfig,
    parallel: ParallelState,
    engine: Engine,
    plan: BatchPlan,
    data: TrainingData,
    start: int,
) -> None:
    """Rank 0: print what is about to run (the composed config too with trainer.print_config)."""
    if cfg.trainer.print_config:
        print(compact_config(cfg))
    params, dims = engine.module.num_params(), parallel.dims
    print(
        f"moe-train: {cfg.router.kind} router, {params['total'] / 1e6:.2f}M params on this rank "
        f"({params['expert'] / 1e6:.2f}M expert), world {dims.world_size} (ep {dims.ep} x "
        f"dp {dims.dp}), {plan.micro}x{plan.grad_accum} sequences per rank per step, device "
        f"{parallel.device}, {data.describe(plan.global_batch, plan.seq_len)}"
        + (f", resumed at step {start}" if start else "")
    )


register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base=None)
def _hydra_main(dcfg: DictConfig) -> None:
    cfg: TrainConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    from hydra.core.hydra_config import HydraConfig

    apply_init_from(cfg, explicit_fields(HydraConfig.get().overrides.task))
    if train(cfg).get("stopped"):
        sys.exit(EXIT_RESUME)  # stopped to be resumed (moe_train.training.stop)


def main() -> None:
    """Console script `moe-train`: `--help` lists the groups and every field; a planner-only
    override (cluster=...) is refused with what to do instead."""
    args = sys.argv[1:]
    bad = planner_override(args)
    if bad is not None:
        sys.exit(PLANNER_OVERRIDE_ERROR.format(arg=bad))
    if "--help" in args or "-h" in args:
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            dcfg = compose("train", overrides=[a for a in args if a not in ("--help", "-h")])
        print(render_help(OmegaConf.to_object(dcfg), CONFIG_DIR))
        return
    _hydra_main()


if __name__ == "__main__":
    main()
