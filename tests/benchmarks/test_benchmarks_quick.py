"""Smoke tests: every benchmark script runs with --quick and writes its JSON. No timing checks."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def run(script: str, tmp_path: Path, *extra: str, timeout: float = 300) -> dict:
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), "--quick", "--out", str(tmp_path), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "machine:" in proc.stdout
    return json.loads((tmp_path / f"{script}.json").read_text())


@pytest.mark.slow
def test_moe_layer_quick(tmp_path):
    out = run("moe_layer", tmp_path, "--routers", "top1", "sam2", "--backends", "auto", "loop")
    cases = {(c["name"], c["capacity_factor"]): c["contenders"] for c in out["cases"]}
    assert set(cases) == {("top1", 1.25), ("top1", None), ("sam2", 1.25), ("sam2", None)}
    for (name, _), contenders in cases.items():
        dense = f"dense FFN (d_ff {128 * (1 if name == 'top1' else 2)})"  # k x d_ff
        assert set(contenders) == {"moe-train (auto)", "moe-train (loop)", dense}
        assert all(v["median_s"] > 0 and v["vs_dense"] > 0 for v in contenders.values())
        assert contenders[dense]["vs_dense"] == 1.0


@pytest.mark.slow
@pytest.mark.distributed
def test_comm_volume_quick(tmp_path):
    res = run("comm_volume", tmp_path)["results"]
    for name in ("switch", "topk2", "prototype2", "sam2", "expert_choice"):
        assert res[name]["counters_match_analytic"], name
    assert res["sam2"]["dispatch_bytes_per_token"] == res["switch"]["dispatch_bytes_per_token"]
    assert res["sam2"]["dispatch_bytes_per_token"] < res["topk2"]["dispatch_bytes_per_token"]
    assert "skipped" in res["tree"]  # 7 node experts do not split over 4 ranks


@pytest.mark.slow
def test_quality_quick(tmp_path):
    out = run(
        "quality", tmp_path, "--only", "dense", "switch", "sam2", "--plot", str(tmp_path / "q.png")
    )
    assert set(out["summary"]) == {"dense", "switch", "sam2"}
    for s in out["summary"].values():
        assert s["val_mean"] == s["val_mean"] and s["active_params"] <= s["params"]
    assert out["summary"]["sam2"]["active_params"] > out["summary"]["switch"]["active_params"]


@pytest.mark.slow
@pytest.mark.distributed
def test_scaling_quick(tmp_path):
    res = run("scaling", tmp_path, "--procs", "1", "2")["results"]
    assert [(r["processes"], r["overlap"]) for r in res] == [(1, "on"), (2, "off"), (2, "on")]
    assert all(r["a2a_calls"] > 0 for r in res[1:]) and all(r["tokens_per_s"] > 0 for r in res)
    # the same collectives either way (the own chunk is a zero split when overlapped)
    assert res[2]["a2a_calls"] == res[1]["a2a_calls"]


def _common():
    """benchmarks/_common.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_runs_do_not_overwrite_the_committed_results():
    common = _common()
    QUICK_DIR, RESULTS_DIR, results_dir = common.QUICK_DIR, common.RESULTS_DIR, common.results_dir

    assert results_dir(None, quick=True) == QUICK_DIR != RESULTS_DIR
    assert results_dir(None, quick=False) == RESULTS_DIR
    assert results_dir("elsewhere", quick=True) == Path("elsewhere")
    p = argparse.ArgumentParser()
    common.add_output_args(p, "CI-sized")
    assert common.parse_args(p, ["--quick"]).out == QUICK_DIR
    assert common.parse_args(p, []).out == RESULTS_DIR
    assert common.parse_args(p, ["--quick", "--out", "x"]).out == Path("x")
    scripts = sorted(BENCH.glob("[!_]*.py"))
    assert len(scripts) == 10, scripts
    for script in scripts:  # each takes --quick/--out from the one helper, none its own
        source = script.read_text()
        assert "add_output_args(" in source and " = parse_args(" in source, script.name
        for flag in ('"--out"', '"--quick"'):
            assert f"add_argument({flag}" not in source, (script.name, flag)


@pytest.mark.slow
@pytest.mark.distributed
def test_memory_quick(tmp_path):
    out = run("memory", tmp_path)
    rows = {(r["world"], r["fsdp"]): r for r in out["results"]}
    assert set(rows) == {(1, False), (1, True), (2, False), (2, True)}
    for r in rows.values():
        assert r["state_bytes_max"] == pytest.approx(r["state_bytes_planner"], rel=0.05)
    assert rows[(2, True)]["state_bytes_max"] < rows[(2, False)]["state_bytes_max"]


@pytest.mark.slow
@pytest.mark.distributed  # its overlap step starts 2 ranks (torchrun)
def test_gpu_check_rehearses_every_step_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh with GPU_CHECK_DRY=1: the same steps with --device cpu --quick,
    so an argument or syntax error shows here, not on a lent GPU."""
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed_steps"] == []
    assert [c["model"] for c in summary["compile"]] == ["tiny"]
    assert [(r["processes"], r["overlap"]) for r in summary["overlap"]] == [
        (1, "on"), (2, "off"), (2, "on"),
    ]  # fmt: skip
    names = ("gpu_check.log", "pytest.xml", "moe_layer.json", "dispatch_combine.json")
    for name in (*names, "compile.json", "scaling.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    train = json.loads((tmp_path / "gpu_train.json").read_text())
    assert train["tokens_per_s"] > 0 and train["mfu"] is None  # no peak known for a CPU
    assert train["model_flops_per_token"] >= 6 * train["params_active_matmul"]


@pytest.mark.slow
def test_compile_quick(tmp_path):
    r = run("compile", tmp_path, timeout=600)["results"][0]
    assert r["model"] == "tiny" and r["compile_s"] > 0
    assert r["eager"]["tokens_per_s"] > 0 and r["compiled"]["tokens_per_s"] > 0
    assert r["loss_max_rel_diff"] < 1e-4  # the same training, compiled or not
