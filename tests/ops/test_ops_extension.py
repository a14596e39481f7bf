"""Where the kernels are built and found: TORCH_EXTENSIONS_DIR, a prebuilt folder (as the Docker
image ships it) loaded without a compiler, and one build for many processes behind a file lock.

The processes are subprocesses, since the extension is loaded once per process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moe_train.ops import extension

REPO = Path(__file__).resolve().parents[2]


def test_extension_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MOE_TRAIN_EXT_DIR", raising=False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert extension.extension_dir() == tmp_path / "home" / ".cache" / "moe_train" / "extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "te"))
    assert extension.extension_dir() == tmp_path / "te" / "moe_train"
    monkeypatch.setenv("MOE_TRAIN_EXT_DIR", str(tmp_path / "mine"))
    assert extension.extension_dir() == tmp_path / "mine"


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("MOE_TRAIN_EXT_DIR", "MOE_TRAIN_NO_EXT")
    }
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


_REPORT = textwrap.dedent(
    """
    import json, warnings
    import torch
    from moe_train.ops import extension
    from moe_train.ops.reference import combine_reference
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = extension.load()
    ok = None
    if loaded:
        buf, index = torch.randn(6, 4), torch.tensor([0, 2, 2, 1, 0, 2])
        from moe_train.ops._custom import combine
        ok = torch.allclose(combine(buf, None, index, 3), combine_reference(buf, None, index, 3))
    print(json.dumps(dict(loaded=loaded, prebuilt=extension.loaded_prebuilt(), ok=ok,
                          path=str(extension.library_path()), warnings=[str(c.message) for c in caught])))
    """
)


def _report(env: dict[str, str], cwd: Path) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", _REPORT], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


@pytest.fixture
def shipped(ext, tmp_path) -> Path:
    """A TORCH_EXTENSIONS_DIR holding this session's built kernels, as the image ships them."""
    built = extension.library_path()
    assert built is not None
    root = tmp_path / "torch_extensions"
    shutil.copytree(built.parent, root / "moe_train" / built.parent.name)
    return root


def _no_compiler(tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    return {"CXX": "no-such-compiler", "PATH": str(empty)}


@pytest.mark.slow
def test_prebuilt_kernels_in_torch_extensions_dir_load_without_a_compiler(shipped, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in shipped.rglob("*")}
    rep = _report(_env(TORCH_EXTENSIONS_DIR=str(shipped), **_no_compiler(tmp_path)), tmp_path)
    assert rep["loaded"] and rep["prebuilt"] and rep["ok"], rep
    assert Path(rep["path"]).parent.parent == shipped / "moe_train"
    assert not rep["warnings"]
    assert {p: p.stat().st_mtime_ns for p in shipped.rglob("*")} == before  # nothing written


@pytest.mark.slow
def test_prebuilt_kernels_of_other_sources_are_not_used(shipped, tmp_path):
    kernels = tmp_path / "kernels"
    shutil.copytree(extension.kernels_dir(), kernels)
    with open(kernels / "moe_ops_index.h", "a") as f:
        f.write("\n// changed\n")
    env = _env(TORCH_EXTENSIONS_DIR=str(shipped), MOE_TRAIN_KERNELS_DIR=str(kernels))
    rep = _report({**env, **_no_compiler(tmp_path)}, tmp_path)
    # Stale for these sources: it would have to build, and there is no compiler.
    assert not rep["loaded"] and "no C++ compiler" in rep["warnings"][0], rep


_RANK = textwrap.dedent(
    """
    import json, os, shutil, sys, time
    from pathlib import Path
    import torch
    from moe_train.ops import extension

    shipped, log, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])

    def fake_compile(p, verbose):
        # Stands in for the ~20 s compile: records who compiled, and takes its time.
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(2.0)
        shutil.copy2(shipped, p.library)
        torch.ops.load_library(str(p.library))

    extension._compile = fake_compile
    (log.parent / f"ready.{os.getpid()}").touch()
    while len(list(log.parent.glob("ready.*"))) < n:  # start together
        time.sleep(0.05)
    p = extension._build(verbose=False)
    print(json.dumps(dict(prebuilt=extension._state["prebuilt"], path=str(p.library))))
    """
)


@pytest.mark.distributed
def test_one_build_for_many_processes(ext, tmp_path):
    """Four processes on an empty shared folder: one compiles, the others wait on the lock and
    then load what it built."""
    built = extension.library_path()
    assert built is not None
    sync = tmp_path / "sync"
    sync.mkdir()
    log = sync / "compiled"
    n = 4
    env = _env(TORCH_EXTENSIONS_DIR=str(tmp_path / "shared"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK, str(built), str(log), str(n)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(n)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append((json.loads(out.splitlines()[-1]), err))
    assert len(log.read_text().split()) == 1  # exactly one compile
    assert sorted(r["prebuilt"] for r, _ in results) == [False] + [True] * (n - 1)
    assert len({r["path"] for r, _ in results}) == 1
    assert any("waiting for" in err and "pid" in err for _, err in results)
    stamp = Path(results[0][0]["path"]).with_name("moe_train_ops.stamp.json")
    assert json.loads(stamp.read_text())["sources_sha256"]
