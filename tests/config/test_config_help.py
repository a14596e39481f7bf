"""`moe-train --help` (every field with its description, no planner-only group), the refusal of
`cluster=...`, and the resolved configuration printed at start."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from moe_train.config import TrainConfig
from moe_train.config_help import compact_config, field_docs, planner_override


def every_field() -> list[tuple[type, str]]:
    cfg = TrainConfig()
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += [(type(value), g.name) for g in dataclasses.fields(value)]
        else:
            out.append((TrainConfig, f.name))
    return out


def test_every_field_has_a_description():
    missing = [
        f"{cls.__name__}.{name}" for cls, name in every_field() if not field_docs(cls).get(name)
    ]
    assert not missing, f"fields without a description (a comment on the field line): {missing}"


def moe_train(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from moe_train.train import main; sys.argv[0] = 'moe-train'; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_help_lists_groups_and_every_field_but_not_the_planners():
    p = moe_train("--help")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "router    expert_choice, prototype, sam, switch*, topk, tree" in out
    assert "cluster" not in out.split("Fields")[0]  # the groups part
    for cls, name in every_field():
        key = name if cls is TrainConfig else None
        assert (key or f".{name} [") in out, name
    assert "model.vocab_size [null]  null = the data's vocabulary" in out
    tiny = moe_train("model=tiny", "--help").stdout
    assert "model.d_model [64]" in tiny  # the defaults of the chosen options


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["cluster=a100_80gb", "+cluster=v100_32gb", "cluster.world_size=8"])
def test_a_planner_group_is_refused_with_what_to_do(arg):
    p = moe_train(arg)
    assert p.returncode != 0
    assert "moe-train-plan" in p.stderr and "torchrun" in p.stderr and "parallel.ep" in p.stderr
    assert planner_override(["model=tiny", arg]) == arg
    assert planner_override(["trainer.run_dir=clusters/x"]) is None


def test_compact_config_is_one_line_per_group():
    cfg = TrainConfig()
    cfg.model.vocab_size = 320
    lines = compact_config(cfg).splitlines()
    assert lines[0] == "config:" and len(lines) == 8
    assert lines[1].startswith("  model    vocab_size=320 seq_len=128")
    assert "resume=true" in lines[6] and "micro_batch_size=null" in lines[6]
    assert lines[7] == "  seed=1337"
