"""The Hydra command line: `moe-train-plan` / `python -m moe_train.plan` (configs/plan.yaml)."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from typing import Any

from .config import ClusterConfig, PlanOptions
from .planner import make_plan
from .render import render

ASSUMED_VOCAB = 256  # model.vocab_size when a training config leaves it to the data (bytes)


def _to_dataclass(cls: type, node: Any, where: str) -> Any:
    from omegaconf import OmegaConf

    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), node)
    except Exception as e:  # unknown key or wrong type, named by OmegaConf
        raise ValueError(f"{where}: {e}".splitlines()[0]) from None
    return OmegaConf.to_object(merged)


def plan_from_config(cfg: Any) -> tuple[dict[str, Any], PlanOptions]:
    """The plan of a composed Hydra config (model, router, cluster, plan groups)."""
    from ..model import ModelConfig
    from ..routing import RouterConfig

    model_node = dict(cfg.model)
    if model_node.get("vocab_size") is None:  # null = the data's in training; bytes without data
        model_node["vocab_size"] = ASSUMED_VOCAB
    model = _to_dataclass(ModelConfig, model_node, "model")
    router = _to_dataclass(RouterConfig, cfg.router, "router")
    cluster = _to_dataclass(ClusterConfig, cfg.cluster, "cluster")
    _trainer_options(cluster, cfg)
    options = _to_dataclass(PlanOptions, cfg.plan, "plan")
    if cluster.seq_len is None:
        cluster.seq_len = model.seq_len
    return make_plan(model, router, cluster, options), options


def _trainer_options(cluster: ClusterConfig, cfg: Any) -> None:
    """Fill the cluster's trainer fields from the training config groups (parallel, trainer,
    optim: the same files and overrides as `moe-train`)."""
    from omegaconf import OmegaConf

    def get(key: str, default: Any) -> Any:
        value = OmegaConf.select(cfg, key, default=None)
        return default if value is None else value

    ep = get("parallel.ep", 1)
    if ep > 1 and cluster.ep is None:
        cluster.ep = ep
    cluster.fsdp = bool(get("parallel.fsdp", cluster.fsdp))
    cluster.reshard_after_forward = bool(
        get("parallel.reshard_after_forward", cluster.reshard_after_forward)
    )
    cluster.activation_checkpointing = get(
        "trainer.activation_checkpointing", cluster.activation_checkpointing
    )
    cluster.precision = get("trainer.precision", cluster.precision)
    cluster.optimizer = get("optim.name", cluster.optimizer)
    cluster.engine = get("trainer.engine", cluster.engine)
    cluster.zero_stage = int(get("trainer.zero_stage", cluster.zero_stage))
    micro = get("trainer.micro_batch_size", None)
    if micro is not None:
        cluster.micro_batch_size = int(micro)


def _jsonable(x: Any, in_bytes: bool = False) -> Any:
    """JSON-ready: whole floats as ints, and every byte count (a key naming bytes, or a value of
    the memory section) rounded to an integer number of bytes."""
    if isinstance(x, dict):
        return {k: _jsonable(v, in_bytes or "bytes" in k or k == "memory") for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v, in_bytes) for v in x]
    if isinstance(x, float) and math.isfinite(x) and (in_bytes or x.is_integer()):
        return round(x)
    return x


def run(cfg: Any) -> None:
    """Print the plan (tables, or one JSON object with plan.json=true); config errors exit 1."""
    try:
        plan, options = plan_from_config(cfg)
    except ValueError as e:
        sys.exit(f"moe-train-plan: {e}")
    if options.json:
        print(json.dumps(_jsonable(plan)))
        return
    names: dict[str, str] = {}
    with contextlib.suppress(Exception):
        from hydra.core.hydra_config import HydraConfig

        names = dict(HydraConfig.get().runtime.choices)
    print(render(plan, names))


def main() -> None:
    import hydra

    from ..config import CONFIG_DIR

    hydra.main(config_path=CONFIG_DIR, config_name="plan", version_base=None)(run)()
