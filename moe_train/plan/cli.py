"""The command line: `moe-train-plan` / `python -m moe_train.plan`.

The training options are composed exactly as `moe-train` composes them (configs/train.yaml, its
groups, its schema, the same overrides); the planner's own settings, the machine (`cluster=NAME`,
`cluster.*`) and the plan options (`plan.*`), from configs/plan.yaml. No parallel.ep override
(and no parallel=NAME) plans the largest ep the trainer accepts on cluster.world_size GPUs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config_help import field_docs
from .config import PlannerConfig, PlanOptions
from .options import NOT_MODELLED, PLANNED, largest_ep, show
from .planner import make_plan
from .render import render

PLANNER_KEYS = ("cluster", "plan")  # overrides of configs/plan.yaml; all others are moe-train's
# the trainer options earlier planners took under cluster.*: the trainer's own key to use instead
MOVED_TO_TRAINER = {
    "cluster.ep": "parallel.ep (or leave it out: the largest ep the trainer accepts)",
    "cluster.micro_batch_size": "trainer.micro_batch_size",
    "cluster.grad_accum": "trainer.global_batch_size (accumulation = global batch / world / micro)",
    "cluster.seq_len": "model.seq_len",
    "cluster.fsdp": "parallel.fsdp",
    "cluster.reshard_after_forward": "parallel.reshard_after_forward",
    "cluster.activation_checkpointing": "trainer.activation_checkpointing",
    "cluster.precision": "trainer.precision",
    "cluster.optimizer": "optim=NAME (adamw, adafactor)",
    "cluster.engine": "trainer.engine",
    "cluster.zero_stage": "trainer.zero_stage",
}


def _key(arg: str) -> str:
    """'+parallel.ep=2' -> 'parallel.ep'."""
    return arg.lstrip("+~").split("=", 1)[0]


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """(the planner's overrides, moe-train's overrides)."""
    planner = [a for a in args if _key(a).split(".", 1)[0] in PLANNER_KEYS]
    return planner, [a for a in args if a not in planner]


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    from ..config import register_configs

    register_configs()
    ConfigStore.instance().store(name="plan_schema", node=PlannerConfig)


def compose_configs(args: list[str]) -> tuple[Any, PlannerConfig, dict[str, str]]:
    """(TrainConfig as moe-train composes it, PlannerConfig, the group choices)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from ..config import CONFIG_DIR

    _register()
    planner_args, train_args = split_overrides(args)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        train = compose("train", overrides=train_args, return_hydra_config=True)
        planner = compose("plan", overrides=planner_args, return_hydra_config=True)
    choices = {**planner.hydra.runtime.choices, **train.hydra.runtime.choices}
    for node in (train, planner):
        with open_dict(node):
            del node["hydra"]
    names = {k: str(v) for k, v in choices.items() if not k.startswith("hydra")}
    return OmegaConf.to_object(train), OmegaConf.to_object(planner), names  # type: ignore[return-value]


def _check_keys(args: list[str]) -> None:
    """Name the trainer's key for a trainer option given under cluster.*, and the spelling of
    "the largest ep" (ParallelConfig.ep is an int: no null)."""
    for arg in args:
        if _key(arg) in MOVED_TO_TRAINER:
            raise ValueError(
                f"{_key(arg)}: the plan takes the trainer's own options; use "
                f"{MOVED_TO_TRAINER[_key(arg)]}"
            )
        if _key(arg) == "parallel.ep" and arg.split("=", 1)[-1] in ("null", "None", "~"):
            raise ValueError(
                "parallel.ep=null: parallel.ep is an int in the trainer; leave it out to plan "
                "the largest ep the trainer accepts on cluster.world_size GPUs"
            )


def plan_from_overrides(args: list[str]) -> tuple[dict[str, Any], PlanOptions, dict[str, str]]:
    """The plan of a command line (moe-train's overrides and the planner's): (plan, its options,
    the config group choices)."""
    _check_keys(args)
    cfg, planner, names = compose_configs(args)
    ep_given = any(_key(a) in ("parallel", "parallel.ep") for a in split_overrides(args)[1])
    if not ep_given:
        planner.cluster.validate()
        cfg.validate()
        ep = largest_ep(cfg, planner.cluster.world_size)
        cfg = replace(cfg, parallel=replace(cfg.parallel, ep=ep))
    plan = make_plan(cfg, planner.cluster, planner.plan)
    plan["ep_chosen_by_planner"] = not ep_given
    return plan, planner.plan, names


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


def _error_text(e: BaseException) -> str:
    """The error and its cause (Hydra wraps OmegaConf's type errors, which name full_key)."""
    text = str(e)
    if e.__cause__ is not None and str(e.__cause__) not in text:
        text += f"\n{e.__cause__}"
    return text


def _fields(prefix: str, obj: Any) -> list[str]:
    """`key [default]  description` for every field of a config dataclass, nested ones dotted."""
    docs, out = field_docs(type(obj)), []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            out += _fields(key, value)
        else:
            out.append(f"  {key} [{show(value)}]  {docs.get(f.name, '')}".rstrip())
    return out


def render_help(args: list[str]) -> str:
    """The text of `moe-train-plan --help`: usage, the planner's groups and fields (defaults as
    composed), and which training options the plan reads."""
    from ..config import CONFIG_DIR

    _cfg, planner, names = compose_configs(args)
    clusters = sorted(p.stem for p in (Path(CONFIG_DIR) / "cluster").glob("*.yaml"))
    chosen = names.get("cluster")
    planned = [f"{group}.{name}" for group, fields in PLANNED.items() for name in fields]
    out = [
        "moe-train-plan: parameters, memory, all-to-all traffic and compute per GPU of a moe-train",
        "run, before asking for the GPUs.",
        "usage: moe-train-plan [moe-train's overrides ...] [cluster=NAME] [cluster.KEY=VALUE ...]"
        " [plan.KEY=VALUE ...]",
        "   e.g. moe-train-plan model=m6t_1t router=prototype cluster=v100_32gb \\",
        "            cluster.world_size=480 trainer.global_batch_size=480",
        "",
        "Training options: moe-train's own groups and fields with the same overrides (moe-train",
        "--help lists them). No parallel.ep override plans the largest ep the trainer accepts on",
        "cluster.world_size GPUs. The micro batch and the accumulation are the trainer's split of",
        "trainer.global_batch_size over cluster.world_size GPUs.",
        "The plan reads: " + ", ".join(planned) + ".",
        "Not modelled: " + ", ".join(NOT_MODELLED) + "; every other field costs nothing per step.",
        "",
        "Config groups (group=option; * = default):",
        "  cluster   " + ", ".join(c + ("*" if c == chosen else "") for c in clusters),
        "",
        "Fields (key=value; the default in brackets):",
        *_fields("cluster", planner.cluster),
        *_fields("plan", planner.plan),
    ]
    return "\n".join(out)


def run(args: list[str]) -> None:
    """Print the plan (tables, or one JSON object with plan.json=true); config errors exit 1."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if "--help" in args or "-h" in args:
            print(render_help([a for a in args if a not in ("--help", "-h")]))
            return
        flags = [a for a in args if a.startswith("-")]
        if flags:
            raise ValueError(f"unknown flag {flags[0]!r}; moe-train-plan --help lists the options")
        plan, options, names = plan_from_overrides(args)
    except (ValueError, HydraException, OmegaConfBaseException) as e:
        sys.exit(f"moe-train-plan: {_error_text(e)}")
    if options.json:
        print(json.dumps(_jsonable(plan)))
        return
    print(render(plan, names))


def main() -> None:
    """Console script `moe-train-plan`."""
    run(sys.argv[1:])
