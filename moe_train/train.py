"""`moe-train`: train an MoE language model. The whole loop, readable in one sitting.

moe-train                                   # small MoE LM on the embedded default corpus
moe-train router=sam router.top_k=2 model=small trainer.max_steps=500
torchrun --nproc-per-node 4 -m moe_train.train parallel.ep=2
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import CONFIG_DIR, OptimConfig, TrainConfig, register_configs
from .data import TokenFile, get_batch, open_splits, resolve_data_dir, val_batches
from .engines import deepspeed_initialize
from .gpu_stats import gather_gpu_stats, gpu_stats
from .metrics import MetricsWriter, moe_layer_metrics, read_metrics
from .model import MoETransformer
from .parallel import init_parallel, is_expert_param, parallelize
from .routing.noise import mix_seed


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr. A pure function of the step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device):
    """AdamW over four groups: dense/expert x decay/no-decay (experts in their own groups, so
    engines that shard or reduce per group treat them per expert group)."""
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((is_expert_param(p), p.dim() >= 2), []).append(p)
    param_groups = [
        {"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "moe": expert}
        for (expert, decay), ps in sorted(groups.items())
    ]
    betas = (cfg.beta1, cfg.beta2)
    if cfg.impl == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError as e:
            raise RuntimeError(
                "optim.impl=apex needs NVIDIA apex (it ships in NVIDIA's PyTorch containers and the "
                "moe-train Docker image); use optim.impl=torch elsewhere"
            ) from e
        return FusedAdam(param_groups, lr=cfg.lr, betas=betas, eps=cfg.eps, adam_w_mode=True)
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=betas, eps=cfg.eps, **fast)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. auto: bf16 on Ampere+, fp16 on older GPUs, fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lm_loss(model, x: torch.Tensor, y: torch.Tensor, amp, noise_seed: int, token_offset: int):
    """(cross-entropy [scalar], aux [scalar]) for tokens x -> targets y, both [b, T]."""
    with amp():
        logits, aux = model(x, noise_seed=noise_seed, token_offset=token_offset)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), aux


@torch.no_grad()
def evaluate(model, val: TokenFile, cfg: TrainConfig, state, amp) -> float:
    """Mean validation loss over the same fixed windows whatever the layout."""
    model.eval()
    losses = []
    B = cfg.trainer.global_batch_size  # divisible by the world size (checked at start)
    share = B // state.data_world
    for x, y in val_batches(
        val, cfg.model.seq_len, B, cfg.trainer.eval_batches, state.data_rank * share, share
    ):
        loss, _ = lm_loss(model, x.to(state.device), y.to(state.device), amp, 0, 0)
        losses.append(loss)
    model.train()
    if not losses:
        return float("nan")
    return float(state.all_reduce_mean(torch.stack(losses).mean()))


def train(cfg: TrainConfig) -> dict:
    """Train from config; returns the run summary. Resumes from run_dir when it can."""
    cfg.validate()
    state = init_parallel(
        cfg.parallel, cfg.router.num_experts_for(cfg.model.num_experts), cfg.router
    )
    tc, run_dir = cfg.trainer, Path(cfg.trainer.run_dir)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    micro, accum = tc.batch_split(state.data_world)
    data_dir = resolve_data_dir(cfg.data)
    train_tokens, val_tokens = open_splits(data_dir)
    if train_tokens.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
            f"({train_tokens.vocab_size}, {data_dir}); raise model.vocab_size"
        )

    torch.manual_seed(cfg.seed)  # dense init: same on every rank; experts seed from global ids
    raw_model = MoETransformer(cfg.model, cfg.router, seed=cfg.seed, shard=state.dims.expert_shard)
    raw_model.to(state.device)
    # native: groups wired, replicas made identical, dense grads reduced by DDP; DeepSpeed (ep=1,
    # no groups to wire) does the rest itself
    native = tc.engine == "native"
    model = parallelize(raw_model, state.dims, state.groups, cfg.parallel) if native else raw_model
    optimizer = build_optimizer(raw_model, cfg.optim, state.device)
    amp_dtype = autocast_dtype(tc.precision, state.device)
    scaler = torch.amp.GradScaler(state.device.type, enabled=amp_dtype == torch.float16)

    def amp():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(state.device.type, dtype=amp_dtype)

    engine = None  # DeepSpeed engine (trainer.engine=deepspeed): it reduces, clips and steps
    if tc.engine == "deepspeed":
        engine = deepspeed_initialize(
            raw_model, optimizer, ep=state.ep, micro_batch=micro, grad_accum=accum,
            zero_stage=tc.zero_stage, grad_clip=cfg.optim.grad_clip, amp_dtype=amp_dtype,
        )  # fmt: skip
        model, amp_dtype = engine, None  # the engine casts the model itself

    start, best_val, skipped = 0, float("inf"), 0
    ckpt = latest_checkpoint(run_dir) if tc.resume and engine is None else None
    if ckpt is not None:
        extra = load_checkpoint(ckpt, raw_model, optimizer, state)
        start, best_val, skipped = extra["step"], extra["best_val"], extra["skipped"]
        scaler.load_state_dict(extra["scaler"])
    if engine is not None and tc.resume and (run_dir / "deepspeed" / "latest").exists():
        _, extra = engine.load_checkpoint(str(run_dir / "deepspeed"))
        start, best_val, skipped = extra["step"], extra["best_val"], extra["skipped"]
    writer = MetricsWriter(run_dir, enabled=state.is_main, tensorboard=tc.tensorboard)
    if state.is_main:
        _truncate_metrics(run_dir, start)
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
        params = raw_model.num_params()
        print(
            f"moe-train: {cfg.router.kind} router, {params['total'] / 1e6:.2f}M params on this rank "
            f"({params['expert'] / 1e6:.2f}M expert), world {state.world_size} (ep {state.ep} x "
            f"dp {state.dp}), {micro}x{accum} sequences per rank per step, device {state.device}, "
            f"data {data_dir}" + (f", resumed at step {start}" if start else "")
        )

    tokens_per_step = tc.global_batch_size * cfg.model.seq_len
    bar = _progress(start, tc.max_steps, enabled=state.is_main and tc.progress)
    last_loss, t_log, steps_since_log = float("nan"), time.perf_counter(), 0
    for step in range(start, tc.max_steps):
        lr = lr_at(step, cfg.optim, tc.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(mix_seed(cfg.seed, step, state.rank))  # dropout: a function of the step
        noise_seed = mix_seed(cfg.seed, step, 0x0153)  # router noise: same on every rank
        loss_sum = torch.zeros((), device=state.device)
        aux_sum = {}
        for m in range(accum):
            first = state.data_rank * micro * accum + m * micro  # first sample of the global batch
            x, y = get_batch(
                train_tokens, cfg.seed, step, tc.global_batch_size, cfg.model.seq_len, first, micro
            )
            x, y = x.to(state.device), y.to(state.device)
            with state.no_sync(model, last_micro_step=m == accum - 1):  # DDP: reduce once
                loss, aux = lm_loss(model, x, y, amp, noise_seed, first * cfg.model.seq_len)
                if engine is not None:
                    engine.backward(loss + aux)  # DeepSpeed divides by grad_accum itself
                    engine.step()  # applies the update at the accumulation boundary
                else:
                    scaler.scale((loss + aux) / accum).backward()
            loss_sum += loss.detach() / accum
            for k, v in raw_model.last_aux.items():
                aux_sum[k] = aux_sum.get(k, 0.0) + v.detach() / accum
        if engine is not None:
            grad_norm = torch.as_tensor(float(engine.get_global_grad_norm() or 0.0))
            skipped = engine.skipped_steps
        else:
            state.sync_gradients(model)
            scaler.unscale_(optimizer)
            grad_norm = state.clip_grad_norm_(raw_model, cfg.optim.grad_clip)
            if torch.isfinite(grad_norm):
                scaler.step(optimizer)
            else:
                skipped += 1  # non-finite loss or gradients: never applied
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        steps_since_log += 1

        if (step + 1) % tc.log_every == 0 or step + 1 == tc.max_steps:
            last_loss = float(state.all_reduce_mean(loss_sum))
            elapsed = time.perf_counter() - t_log
            record = {
                "loss": last_loss,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_step * steps_since_log / elapsed,
                "skipped_steps": skipped,
                **{
                    f"aux/{k}": float(state.all_reduce_mean(torch.as_tensor(v)))
                    for k, v in aux_sum.items()
                },
                **moe_layer_metrics(raw_model.moe_layers()),
            }
            if state.device.type == "cuda":  # a collective: every rank reports, rank 0 logs
                per_rank = gather_gpu_stats(gpu_stats(state.device.index))
                for r, stats in enumerate(per_rank or []):
                    record.update({f"gpu{r}/{k}": v for k, v in stats.items()})
            writer.log(step + 1, record)
            bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            t_log, steps_since_log = time.perf_counter(), 0
        if tc.eval_batches and ((step + 1) % tc.eval_every == 0 or step + 1 == tc.max_steps):
            val_loss = evaluate(model, val_tokens, cfg, state, amp)
            best_val = min(best_val, val_loss)
            writer.log(step + 1, {"val_loss": val_loss})
            if state.is_main and not tc.progress:
                print(f"step {step + 1}: train loss {last_loss:.4f}, val loss {val_loss:.4f}")
        if (step + 1) % tc.ckpt_every == 0 or step + 1 == tc.max_steps:
            extra = {
                "step": step + 1,
                "best_val": best_val,
                "skipped": skipped,
                "scaler": scaler.state_dict(),
            }
            if (
                engine is not None
            ):  # DeepSpeed's own (ZeRO-partitioned) format, in run_dir/deepspeed
                tag = f"step_{step + 1:08d}"
                engine.save_checkpoint(str(run_dir / "deepspeed"), tag, client_state=extra)
            else:
                save_checkpoint(
                    run_dir, step + 1, raw_model, optimizer, extra, state, keep=tc.keep_checkpoints
                )
        bar.update(1)
    bar.close()
    writer.close()
    summary = {
        "steps": tc.max_steps,
        "final_loss": last_loss,
        "best_val_loss": best_val,
        "skipped_steps": skipped,
    }
    if state.is_main:
        print(
            f"done: {tc.max_steps} steps, train loss {last_loss:.4f}, best val loss {best_val:.4f}, "
            f"{skipped} skipped steps, run folder {run_dir}"
        )
    state.shutdown()
    return summary


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint (they will be logged again)."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        keep = [r for r in read_metrics(run_dir) if r["step"] <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(path)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def _progress(start: int, total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


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
