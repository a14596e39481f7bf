"""A trained run on one process: its config, its newest checkpoint in a 1-process model, its
tokenizer. What `moe-train-generate`, `moe-train-eval` and `moe-train-export` start from.

The checkpoint stores one key per global expert, so a run trained in any ep x dp layout loads
into the ep=1 model here (CPU or one GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from ..config import TrainConfig
from ..data.tokenizers import TOKENIZER_FILE, HFTokenizer, Tokenizer
from ..model import MoETransformer, with_legacy_body

CONFIG_FILE = "config.yaml"


class RunError(RuntimeError):
    """A run folder cannot be used for inference; the message says why and what to do."""


@dataclass
class LoadedRun:
    cfg: TrainConfig  # the run's config.yaml (model.vocab_size resolved)
    model: MoETransformer  # all experts, eval mode, on the requested device
    tokenizer: Tokenizer
    step: int  # optimizer steps of the loaded checkpoint
    checkpoint: Path


def pick_device(name: str = "auto") -> torch.device:
    """auto: the current GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig a run saved at start (run_dir/config.yaml), checked against the schema.
    A config written before a body field existed gets the value the run trained with (the GPT-2
    body's: moe_train.model.LEGACY_BODY), never the new default."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunError(
            f"{run_dir}: no {CONFIG_FILE}; give the run folder of a `moe-train` run "
            "(trainer.run_dir, e.g. runs/switch-d128x4-e8)"
        )
    saved = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(saved, dict):
        raise RunError(f"{path}: not a moe-train config (a mapping of config groups)")
    saved["model"] = with_legacy_body(saved.get("model") or {})  # a run older than the body keys
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), saved)
    cfg: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if cfg.model.vocab_size is None:
        raise RunError(f"{path}: model.vocab_size is null; the run never started training")
    return cfg


def run_tokenizer(run_dir: str | Path, cfg: TrainConfig) -> Tokenizer:
    """The run's tokenizer: the tokenizer.json training copied into the run folder, else its
    data's (the first source of a mixture), else bytes (the default corpus)."""
    own = Path(run_dir) / TOKENIZER_FILE
    if own.is_file():
        return HFTokenizer.from_file(own)
    from ..data.config import data_tokenizer

    return data_tokenizer(cfg.data, cfg.model.vocab_size)


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu", checkpoint: str | Path | None = None
) -> LoadedRun:
    """The run's newest checkpoint (or `checkpoint`) in a 1-process model on `device`."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if path is None:
        if (run_dir / "deepspeed").is_dir():
            raise RunError(
                f"{run_dir}: only DeepSpeed checkpoints (trainer.engine=deepspeed, DeepSpeed's own "
                "format); these tools read moe-train's checkpoints (trainer.engine=native)"
            )
        raise RunError(f"{run_dir}: no checkpoint yet (trainer.ckpt_every saves them)")
    model = MoETransformer(cfg.model, cfg.router, seed=cfg.seed)
    try:
        extra = load_checkpoint(path, model)
    except CheckpointError as e:
        raise RunError(str(e)) from e
    model.to(device if isinstance(device, torch.device) else pick_device(device)).eval()
    step = int(extra.get("step", 0)) if isinstance(extra, dict) else 0
    return LoadedRun(cfg, model, run_tokenizer(run_dir, cfg), step, path)


def autocast_for(device: torch.device):
    """bf16 autocast on GPUs that have it (fp16 otherwise), nothing on the CPU."""
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)
