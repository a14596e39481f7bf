"""The parts of issue 24's stop rules, one at a time (the runs are in test_preemption.py):
durations and signal names, the handlers, the time-limit rule, the fault points, the console of
ranks > 0, bar or lines, the stall report and the watchdog's limits."""

from __future__ import annotations

import io
import os
import signal
import sys
import time
import warnings

import pytest

from moe_train import fault_points
from moe_train.config import TrainerConfig
from moe_train.parallel import ParallelConfig, ParallelState
from moe_train.training import logger as logger_mod
from moe_train.training.console import RankPrefixed, rank_console
from moe_train.training.logger import TrainLogger, log_line
from moe_train.training.stop import (
    SAVE_SAFETY,
    TIME_MARGIN_S,
    StopRule,
    StopSignals,
    parse_duration,
    signal_numbers,
)
from moe_train.training.watchdog import AUTO_MARGIN_S, FIRST_LIMIT_S, Watchdog, stall_report
from tests.helpers.runs import tiny_cfg


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3h50m", 13800.0), ("90m", 5400.0), ("1d2h", 93600.0), ("45s", 45.0), ("3600", 3600.0),
     (" 1h 30m ", 5400.0), (120, 120.0), ("0.5s", 0.5)],
)  # fmt: skip
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["3x", "h", "1h30", "-5", "0", "1h-2m"])
def test_bad_durations_name_the_field_and_the_forms(text):
    with pytest.raises(ValueError, match=r"trainer\.time_limit="):
        parse_duration(text)


def test_signal_names_are_checked_when_the_config_is():
    assert signal_numbers(["SIGTERM", "usr1", "INT"]) == [
        signal.SIGTERM, signal.SIGUSR1, signal.SIGINT,
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"trainer\.stop_signals: 'SIGKILL' is not a signal"):
        TrainerConfig(stop_signals=["SIGKILL"]).validate()
    with pytest.raises(ValueError, match=r"trainer\.time_limit='soon'"):
        TrainerConfig(time_limit="soon").validate()


def test_handlers_only_set_a_flag_and_a_second_signal_changes_nothing(capfd):
    signals = StopSignals([signal.SIGUSR1, signal.SIGUSR2], rank=3)
    before = signal.getsignal(signal.SIGUSR1)
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)  # Python runs the handlers at the next bytecode boundary
    finally:
        signals.restore()
    assert signals.received == "SIGUSR1"  # the first one is the reason
    assert signal.getsignal(signal.SIGUSR1) is before
    err = capfd.readouterr().err
    assert "[rank 3] moe-train: SIGUSR1: stopping after this step" in err
    assert "SIGUSR2: already stopping (SIGUSR1); the save goes on" in err


def test_the_time_limit_leaves_one_step_and_the_save():
    single = ParallelState(ParallelConfig())
    now = time.perf_counter()
    rule = StopRule(StopSignals([]), single, time_limit_s=100.0, started=now - 80.0, save_s=4.0)
    rule.slowest_step = 1.0
    assert rule.time_needed() == pytest.approx(1.0 + SAVE_SAFETY * 4.0 + TIME_MARGIN_S)  # 12 s
    assert rule.check() is None  # 20 s left: another step fits with its save
    rule.started = now - 90.0  # 10 s left
    assert rule.check() == "trainer.time_limit"
    rule.started = now - 80.0
    rule.save_done(20.0)  # a slower save measured: 1 + 30 + 5 > 20
    assert rule.check() == "trainer.time_limit"
    unlimited = StopRule(StopSignals([]), single, time_limit_s=None, started=now - 1e9)
    assert unlimited.check() is None
    signalled = StopSignals([])
    signalled.received = "SIGTERM"
    assert StopRule(signalled, single, time_limit_s=None, started=now).check() == "SIGTERM"


def test_fault_spec_errors_name_the_form(monkeypatch):
    monkeypatch.setenv(fault_points.ENV, "forwards@2")
    with pytest.raises(ValueError, match=r"POINT@STEP\[:RANK\]\[=ACTION\]"):
        fault_points.reached("forward", 2)


def test_a_fault_acts_once_at_its_point_step_and_rank(monkeypatch):
    monkeypatch.setenv(fault_points.ENV, "eval@3:1=USR1")
    monkeypatch.setenv("RANK", "1")
    fault_points.reset()
    got = []
    previous = signal.signal(signal.SIGUSR1, lambda n, f: got.append(n))
    try:
        for point, step in [("eval", 2), ("forward", 3), ("eval", 3), ("eval", 3)]:
            fault_points.reached(point, step)
            time.sleep(0.01)
        monkeypatch.setenv("RANK", "0")
        fault_points.reset()
        fault_points.reached("eval", 3)  # another rank: nothing
        time.sleep(0.01)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert got == [signal.SIGUSR1]


def test_ranks_above_0_prefix_every_stderr_line(capsys):
    with rank_console(2):  # (Python's warnings are written to sys.stderr as it is then)
        sys.stderr.write(warnings.formatwarning("experts are idle", UserWarning, "layer.py", 7))
        sys.stderr.write("two\nlines\n")
    with rank_console(0):
        sys.stderr.write("rank 0 as it is\n")
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "rank 0 as it is"
    assert all(line.startswith("[rank 2] ") for line in err[:-1]) and len(err) == 4
    assert "[rank 2] two" in err and "[rank 2] lines" in err
    out = io.StringIO()
    stream = RankPrefixed(out, 1)
    stream.write("par")
    stream.write("tial\n[rank 1] already\n")
    assert out.getvalue() == "[rank 1] partial\n[rank 1] already\n"


def test_a_terminal_gets_the_bar_a_file_gets_lines(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path / "run", str(tmp_path / "cache"), "trainer.progress=true")
    cfg.model.vocab_size = 256  # set from the data when training
    single = ParallelState(ParallelConfig())
    monkeypatch.setattr(logger_mod, "_is_terminal", lambda stream: True)
    on_tty = TrainLogger(cfg, single, start=0)
    assert not on_tty.lines and type(on_tty.bar).__name__ == "tqdm"
    on_tty.close()
    monkeypatch.setattr(logger_mod, "_is_terminal", lambda stream: False)
    in_file = TrainLogger(cfg, single, start=0)
    assert in_file.lines and type(in_file.bar).__name__ == "_NoBar"
    in_file.close()


def test_log_line_shows_the_records_values():
    record = {"loss": 4.56789, "lr": 3e-4, "grad_norm": 1.23456, "step_ms": 12.34,
              "tokens_per_s": 5000.4, "skipped_steps": 2, "moe0/dropped_frac": 0.1,
              "moe1/dropped_frac": 0.3, "aux/z": 0.01}  # fmt: skip
    assert log_line(7, 10, record) == (
        "step=7/10 loss=4.5679 lr=3.000e-04 grad_norm=1.235 step_ms=12.3 tokens_per_s=5000 "
        "dropped_frac=0.2000 skipped_steps=2"
    )


def test_the_stall_report_names_the_ranks_behind_and_the_silent_ones():
    reports = {
        0: {"step": 7, "collectives": 40, "phase": "step", "seconds": 301.0},
        1: {"step": 7, "collectives": 38, "phase": "step", "seconds": 300.5},
        3: {"step": 6, "collectives": 30, "phase": "save", "seconds": 299.0},
    }
    text = stall_report(reports, world=4)
    assert "ranks behind: 1, 3 (the others wait for them)" in text
    assert "no report from ranks 2 (dead, or holding the GIL)" in text
    even = {r: {"step": 7, "collectives": 40, "phase": "step", "seconds": 1.0} for r in (0, 1)}
    assert "no rank is behind" in stall_report(even, world=2)


def test_the_default_stall_limit_follows_the_slowest_phase_of_its_kind(tmp_path):
    dog = Watchdog(tmp_path, rank=0, world=1, timeout_s=None)
    assert dog.limit("step") == dog.limit("save") == FIRST_LIMIT_S
    dog.slowest.update(step=2.0, save=30.0)
    assert dog.limit("step") == dog.limit("between steps") == 2.0 + AUTO_MARGIN_S
    assert dog.limit("save") == 30.0 + AUTO_MARGIN_S and dog.limit("eval") == FIRST_LIMIT_S
    assert Watchdog(tmp_path, 0, 1, timeout_s=42.0).limit("eval") == 42.0
    assert not Watchdog(tmp_path, 0, 1, timeout_s=0).enabled
