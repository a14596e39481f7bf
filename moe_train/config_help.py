"""`moe-train --help` and the resolved configuration printed at start, from the config dataclasses.

Every field's one-line description comes from its dataclass, in this order: the comment on the
field's line, the comment lines right above it, or its `name: text` entry in the class docstring
(tests/config/test_config_help.py checks that every field of TrainConfig has one).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

_FIELD = re.compile(r"^(\s+)(\w+)\s*:\s*[^=#]+?(?:=.*?)?(?:#\s*(?P<comment>.*))?$")
_TYPE_IGNORE = re.compile(r"^type:\s*ignore(\[[^\]]*\])?\s*#?\s*")  # before the description
_DOC_ENTRY = re.compile(r"^\s*(\w+):\s+(.*)$")
PLANNER_ONLY_GROUPS = ("cluster",)  # config groups of moe-train-plan, not of the training app
GROUP_FIELDS = ("model", "router", "parallel", "optim", "data", "trainer")


def _class_docs(cls: type) -> dict[str, str]:
    """Descriptions written in one class's own source."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    own = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    docs: dict[str, str] = {}
    above: list[str] = []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        m = _FIELD.match(line)
        if m and m.group(2) in own and m.group(2) not in docs and not stripped.startswith("def "):
            comment = _TYPE_IGNORE.sub("", m.group("comment") or "")
            text = comment.strip() or " ".join(above)
            if text:
                docs[m.group(2)] = text
        above = []
    for name, text in _docstring_entries(cls.__doc__ or "").items():
        if name in own:
            docs.setdefault(name, text)
    return docs


def _docstring_entries(doc: str) -> dict[str, str]:
    """`name: text` entries of a docstring (continuation lines indented under them)."""
    out: dict[str, str] = {}
    current = None
    for line in inspect.cleandoc(doc).splitlines():
        m = _DOC_ENTRY.match(line)
        if m and not line.startswith(" "):
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and line.startswith(" ") and line.strip():
            out[current] += " " + line.strip()
        else:
            current = None
    return out


def field_docs(cls: type) -> dict[str, str]:
    """field name -> description, looking through the class and its bases (the subclass wins)."""
    docs: dict[str, str] = {}
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass):
            for name, text in _class_docs(klass).items():
                docs.setdefault(name, text)
    return docs


def dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {"group.key": value}, the way overrides spell keys."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value: Any) -> str:
    """A value as an override would spell it (null, true, false)."""
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def compact_config(cfg: Any) -> str:
    """The resolved TrainConfig in one block: one line per group, `key=value` pairs."""
    plain = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(plain, dict)
    lines, rest = ["config:"], []
    for key, values in plain.items():
        group = str(key)
        if isinstance(values, dict):
            pairs = " ".join(f"{k}={_show(v)}" for k, v in dotted(values).items())
            lines.append(f"  {group:<9}" + pairs)
        else:
            rest.append(f"{group}={_show(values)}")
    if rest:
        lines.append("  " + " ".join(rest))
    return "\n".join(lines)


def _group_options(config_dir: Path) -> dict[str, tuple[list[str], str | None]]:
    """group -> (options, default option) of the training app (planner-only groups left out)."""
    defaults: dict[str, str] = {}
    train = OmegaConf.load(config_dir / "train.yaml")
    for entry in train.get("defaults", []) if isinstance(train, DictConfig) else []:
        if isinstance(entry, dict) or OmegaConf.is_dict(entry):
            for k, v in dict(entry).items():
                defaults[str(k)] = str(v)
    out = {}
    for folder in sorted(p for p in config_dir.iterdir() if p.is_dir()):
        if folder.name not in PLANNER_ONLY_GROUPS:
            options = sorted(p.stem for p in folder.glob("*.yaml"))
            out[folder.name] = (options, defaults.get(folder.name))
    return out


def render_help(cfg: Any, config_dir: str | Path) -> str:
    """The text of `moe-train --help`: groups and their options, then every field with its
    default (as composed from configs/train.yaml) and its description."""
    from .config import TrainConfig

    out = [
        "moe-train: train a Mixture-of-Experts language model (a Hydra app).",
        "usage: moe-train [group=option ...] [key=value ...]",
        "   e.g. moe-train model=tiny router=sam router.top_k=2 trainer.max_steps=200",
        "        torchrun --nproc-per-node 4 -m moe_train.train parallel.ep=2",
        "",
        "Config groups (group=option; * = default):",
    ]
    for group, (options, default) in _group_options(Path(config_dir)).items():
        names = ", ".join(o + ("*" if o == default else "") for o in options)
        out.append(f"  {group:<9} {names}")
    out += ["", "Fields (key=value; the default in brackets):"]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            docs = field_docs(type(value))
            for sub in dataclasses.fields(value):
                out.append(_field_line(f"{f.name}.{sub.name}", getattr(value, sub.name), docs))
        else:
            out.append(_field_line(f.name, value, field_docs(TrainConfig)))
    out += [
        "",
        "Other commands: moe-train-prepare, moe-train-generate, moe-train-eval, moe-train-export,",
        "moe-train-plan (the capacity planner: its cluster=... group is not a training option).",
        "Hydra's own options: moe-train --hydra-help",
    ]
    return "\n".join(out)


def _field_line(key: str, value: Any, docs: dict[str, str]) -> str:
    return f"  {key} [{_show(value)}]  {docs.get(key.rsplit('.', 1)[-1], '')}".rstrip()


def planner_override(args: list[str]) -> str | None:
    """The first command-line override aimed at a planner-only group (`cluster=...`), if any."""
    for arg in args:
        key = arg.lstrip("+~").split("=", 1)[0].split(".", 1)[0]
        if key in PLANNER_ONLY_GROUPS:
            return arg
    return None


PLANNER_OVERRIDE_ERROR = (
    "moe-train: {arg!r}: `cluster` is a config group of the capacity planner (moe-train-plan), "
    "not of training. Training runs on the processes it is launched with: choose the world with "
    "torchrun (--nproc-per-node, --nnodes) and the layout with parallel.ep; size a cluster with "
    "`moe-train-plan {arg}`."
)
