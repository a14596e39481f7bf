"""Issue 24's probes: a signal (or the time limit) at a named point of a run stops every rank at
one step with a complete, verified, published checkpoint of it, and resuming gives the
uninterrupted run's loss at every logged step; a stalled rank is named and every rank exits.

One run folder per layout is stopped again and again (each segment a probe, the last one trains
to the end), so a handful of runs covers every point: the signal lands at the point by
MOE_TRAIN_FAULT (moe_train/fault_points.py), not by timing. 1 process runs in this process; the
2-rank layouts (FSDP, ep=2) run every segment inside one pair of spawned ranks.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

from moe_train.checkpoint import latest_checkpoint, verify_checkpoint
from moe_train.metrics import read_metrics
from moe_train.parallel.launch_env import free_port
from moe_train.train import train
from moe_train.training.stop import STOPPED_FILE
from tests.helpers.distributed import run_ranks
from tests.helpers.runs import losses, tiny_cfg

STEPS = 8
# saves at 3, 6, 8 (the last), validation at 4, 8; every step logged
RUN = [f"trainer.max_steps={STEPS}", "trainer.ckpt_every=3", "trainer.eval_every=4"]


def segment(run_dir: Path, cache: str, fault: str | None, *extra: str) -> dict:
    """One run of the chain: train until the fault stops it (or to the end)."""
    if fault:
        os.environ["MOE_TRAIN_FAULT"] = fault
    try:
        return train(tiny_cfg(run_dir, cache, *RUN, *extra))
    finally:
        os.environ.pop("MOE_TRAIN_FAULT", None)


def check_stop(run_dir: Path, summary: dict, steps: set[int]) -> int:
    """The segment stopped at one of `steps` with a published, verifying checkpoint of it."""
    assert summary.get("stopped"), summary
    step = summary["steps"]
    assert step in steps, (step, steps)
    latest = latest_checkpoint(run_dir)
    assert latest is not None and latest.name == f"step_{step:08d}"
    assert (run_dir / "latest").read_text().strip() == latest.name
    verify_checkpoint(latest)
    assert not list(run_dir.glob(".tmp_step_*")), "a partial save was left"
    assert (run_dir / STOPPED_FILE).read_text().startswith(f"step={step} ")
    return step


# fault, steps it may stop at, extra overrides: each step is a segment of one run folder
CHAIN_1 = [
    ("forward@0", {1}, ()),  # in step 0's forward: stops after step 1
    ("step@1", {2}, ()),  # the first step after the resume
    ("save@3", {3}, ()),  # inside the synchronous save of step 3: that save is the stop's
    ("eval@4", {4}, ()),  # in the validation after step 4
    ("backward@4", {5}, ()),  # inside autograd's backward of step 4
    (None, {6}, ("trainer.time_limit=0.001s",)),  # no signal: the time is up after one step
]  # (async saves exist on distributed runs only: the FSDP chain stops with one in flight)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted 1-process run every probe is compared with, its stdout captured (not a
    terminal, trainer.progress on: the log lines of a Slurm file)."""
    root = tmp_path_factory.mktemp("reference")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        summary = segment(root / "run", str(root / "corpus"), None, "trainer.progress=true")
    assert not summary.get("stopped")
    return {"losses": losses(root / "run"), "stdout": stdout.getvalue(), "run_dir": root / "run"}


LINE = re.compile(r"^step=(\d+)/(\d+)((?: \w+=\S+)+)$")


def test_a_log_file_gets_one_plain_line_per_log_step_with_what_metrics_jsonl_records(reference):
    out = reference["stdout"]
    assert "\r" not in out and "it/s" not in out  # no progress bar in a file
    lines = [m for m in map(LINE.match, out.splitlines()) if m]
    train_lines, val_lines = {}, {}
    for m in lines:
        fields = dict(kv.split("=") for kv in m[3].split())
        (val_lines if "val_loss" in fields else train_lines)[int(m[1])] = fields
    assert all(int(m[2]) == STEPS for m in lines)
    records = {}
    for r in read_metrics(reference["run_dir"]):
        records.setdefault(r["step"], {}).update(r)
    assert sorted(train_lines) == list(range(1, STEPS + 1))  # log_every=1
    assert sorted(val_lines) == [4, 8]  # eval_every=4 and the last step
    for step, fields in train_lines.items():
        r = records[step]
        drops = [v for k, v in r.items() if k.endswith("/dropped_frac")]
        expected = {**r, "dropped_frac": sum(drops) / len(drops)}
        assert set(fields) == {
            "loss",
            "lr",
            "grad_norm",
            "step_ms",
            "tokens_per_s",
            "dropped_frac",
        }, fields  # fmt: skip  (no mfu on CPUs)
        for key, text in fields.items():  # the value printed, to its printed precision
            digits = len(text.split(".")[1].split("e")[0]) if "." in text else 0
            assert float(text) == pytest.approx(expected[key], rel=1e-3, abs=10**-digits), key
    for step, fields in val_lines.items():
        assert float(fields["val_loss"]) == pytest.approx(records[step]["val_loss"], abs=1e-4)


@pytest.mark.slow
def test_one_process_stops_at_every_point_and_resumes_to_the_same_curve(tmp_path, reference):
    cache = str(tmp_path / "corpus")
    run_dir = tmp_path / "stopped"
    for fault, steps, extra in CHAIN_1:
        check_stop(run_dir, segment(run_dir, cache, fault, *extra), steps)
    final = segment(run_dir, cache, None)
    assert final["steps"] == STEPS and not final.get("stopped")
    assert not (run_dir / STOPPED_FILE).exists()
    assert losses(run_dir) == reference["losses"]  # every logged loss, bit for bit
    assert len(losses(run_dir)) == STEPS


def _chain_on_ranks(
    rank: int, world: int, root: str, cache: str, layout: list, chain: list, ports: list
):
    """Every segment of `chain` on this rank, then the last one to the end; returns each
    segment's summary. Each train call makes and tears down its process group, each on a port
    of its own (as a requeued job's fresh processes do: no store of the last segment lingers)."""
    run_dir = Path(root) / "run"
    out = []
    for (fault, _, extra), port in zip([*chain, (None, None, ())], ports):
        os.environ["MASTER_PORT"] = str(port)
        out.append(segment(run_dir, cache, fault, *layout, *extra))
    return out


def check_chain_on_ranks(tmp_path: Path, single_curve: dict, layout: list, chain: list) -> None:
    cache = str(tmp_path / "corpus")
    ports = [free_port() for _ in range(len(chain) + 1)]
    summaries = run_ranks(
        _chain_on_ranks, 2, str(tmp_path), cache, layout, chain, ports, timeout=300
    )
    run_dir = tmp_path / "run"
    for s0, s1 in zip(*summaries):  # the same step, stopped or not, on both ranks
        assert (s0["steps"], bool(s0.get("stopped"))) == (s1["steps"], bool(s1.get("stopped")))
    stops = [s["steps"] for s in summaries[0][:-1]]
    for (_, steps, _), step in zip(chain, stops):
        assert step in steps, (stops, chain)
    assert summaries[0][-1]["steps"] == STEPS and not summaries[0][-1].get("stopped")
    verify_checkpoint(latest_checkpoint(run_dir))
    multi = losses(run_dir)
    assert sorted(multi) == list(range(1, STEPS + 1))
    for step, loss in single_curve.items():
        assert multi[step] == pytest.approx(loss, rel=1e-4), f"step {step}"


@pytest.mark.distributed
def test_fsdp_two_ranks_stop_when_one_rank_is_signalled(tmp_path, reference):
    """Each signal reaches one rank only; both stop at the same step. Async saves."""
    chain = [
        ("forward@1:1", {2}, ()),  # rank 1's forward
        ("step@2:1", {3}, ()),  # the first step after the resume, rank 1
        # rank 0's writer thread, saving step 6 in the background (the save of 4 was the
        # segment's first, waited for): the flag is seen after step 6 or 7
        ("async_save@6:0", {6, 7}, ()),
    ]
    layout = ["parallel.fsdp=true", "trainer.async_checkpoint=true", "trainer.ckpt_every=2"]
    check_chain_on_ranks(tmp_path, reference["losses"], layout, chain)


@pytest.mark.distributed
def test_ep2_two_ranks_stop_when_one_rank_is_signalled(tmp_path, reference):
    chain = [
        ("backward@0:0", {1}, ()),  # inside rank 0's backward (its all-to-all's reverse)
        ("save@3:1", {3}, ()),  # rank 1, inside the synchronous save of step 3
        ("eval@4:1", {4}, ()),  # rank 1's validation after step 4
        (None, {5}, ("trainer.time_limit=0.001s",)),  # one step after the resume at 4
    ]
    check_chain_on_ranks(tmp_path, reference["losses"], ["parallel.ep=2"], chain)


def _stall(rank: int, world: int, root: str, cache: str) -> dict:
    os.environ["MOE_TRAIN_FAULT"] = "forward@2:1=sleep:120"  # rank 1 hangs inside step 2
    return train(tiny_cfg(Path(root) / "run", cache, *RUN, "trainer.stall_timeout_s=5"))


_stall.skip_teardown = True  # type: ignore[attr-defined]  # the watchdog ends both processes


@pytest.mark.distributed
def test_a_rank_stuck_in_a_step_is_named_and_every_rank_exits(tmp_path):
    """Rank 1 sleeps in step 2's forward while rank 0 waits for it in the gradient all-reduce:
    both watchdogs fire after trainer.stall_timeout_s, write their stacks, the report names rank
    1 (fewer collectives issued at the same step) and both processes exit 124, no hang."""
    from moe_train.training.watchdog import EXIT_STALLED, STALL_DIR

    codes: list[int | None] = []
    args = (str(tmp_path), str(tmp_path / "corpus"))
    run_ranks(_stall, 2, *args, timeout=240, allow_missing=True, exit_codes=codes)
    assert codes == [EXIT_STALLED, EXIT_STALLED]
    stall = tmp_path / "run" / STALL_DIR
    report = (stall / "report.txt").read_text()
    assert "ranks behind: 1 (the others wait for them)" in report, report
    assert "rank 0: step 2, step for" in report and "rank 1: step 2, step for" in report
    stack = (stall / "rank_00001.txt").read_text()
    assert "fault_points.py" in stack and "in reached" in stack  # where rank 1 is: the sleep
    assert "Thread" in (stall / "rank_00000.txt").read_text()  # every thread's stack
