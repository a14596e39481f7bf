"""`model.init_from=DIR`: the model and router fields a Hugging Face folder's config.json fixes.

The folder's weights are read later, into each rank's own tensors (training/build.py ->
moe_train/inference/hf/load.py); here only the config: every field config.json determines is set
from it, and an override given explicitly on the command line that contradicts it is an error
naming both values (a silently ignored override would train a model the user did not ask for).
"""

from __future__ import annotations

from collections.abc import Collection

from ..config import TrainConfig


def explicit_fields(overrides: Collection[str]) -> set[str]:
    """`model.d_model=64`, `++router.top_k=2` -> {"model.d_model", "router.top_k"}."""
    out = set()
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if "." in key:
            out.add(key)
    return out


def apply_init_from(cfg: TrainConfig, explicit: Collection[str] = ()) -> None:
    """Set cfg.model / cfg.router from cfg.model.init_from's config.json (nothing without it);
    ValueError naming both when an explicit override (`explicit`: "group.field") disagrees."""
    folder = getattr(cfg.model, "init_from", None)  # a bare ModelConfig (tests) has none
    if not folder:
        return
    from ..inference.hf.load import read_hf_config

    fam, model, router = read_hf_config(folder)
    for group, fields, target in (("model", model, cfg.model), ("router", router, cfg.router)):
        for name, value in fields.items():
            if f"{group}.{name}" in explicit and getattr(target, name) != value:
                raise ValueError(
                    f"{group}.{name}={getattr(target, name)!r} contradicts "
                    f"{folder}/config.json ({fam.architecture}: {value!r}); drop the "
                    f"override (model.init_from sets it) or start from another folder"
                )
            setattr(target, name, value)
