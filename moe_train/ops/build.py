"""Build and load the fused dispatch/combine extension (kernels/) with torch.utils.cpp_extension.

JIT on first use, cached in ``$MOE_TRAIN_EXT_DIR`` (default ``~/.cache/moe_train/extensions``),
one build directory per torch version and Python version. CUDA sources are added when torch has
CUDA and a toolkit (nvcc) is found. ``MOE_TRAIN_NO_EXT=1`` forces the PyTorch reference.

Ahead of time (e.g. in a Docker image): ``python -m moe_train.ops.build [--verbose]``.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

_HOW_TO_BUILD = (
    "install a C++ compiler (e.g. `apt-get install g++`) and run `python -m moe_train.ops.build` "
    "to see the build output; set MOE_TRAIN_NO_EXT=1 to use the reference ops without this warning"
)

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "loaded": False, "cuda": False, "error": None}


def kernels_dir() -> Path:
    """Directory of the C++/CUDA sources (``$MOE_TRAIN_KERNELS_DIR`` or the repo's kernels/)."""
    env = os.environ.get("MOE_TRAIN_KERNELS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "kernels"


def extension_dir() -> Path:
    """Root of the build cache."""
    env = os.environ.get("MOE_TRAIN_EXT_DIR")
    return Path(env) if env else Path.home() / ".cache" / "moe_train" / "extensions"


def disabled() -> bool:
    return os.environ.get("MOE_TRAIN_NO_EXT", "0") not in ("", "0")


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _cuda_home() -> str | None:
    """The CUDA toolkit to build with, if torch has CUDA and nvcc exists; None otherwise."""
    if torch.version.cuda is None:
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None:
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            return None
        home = str(Path(nvcc).resolve().parents[1])
    return home if (Path(home) / "bin" / "nvcc").exists() else None


def _wheel_cuda_includes() -> list[str]:
    """CUDA headers shipped with torch's nvidia-* wheels (e.g. site-packages/nvidia/cu13/include)."""
    site = Path(torch.__file__).resolve().parents[1]
    pats = ["nvidia/cu*/include", "nvidia/cuda_runtime/include"]
    return sorted(p for pat in pats for p in glob.glob(str(site / pat)))


def _build(verbose: bool) -> bool:
    """Compile (or reuse) and load the extension; returns True when it has CUDA kernels."""
    from torch.utils import cpp_extension

    src = kernels_dir()
    if not (src / "moe_ops.cpp").exists():
        raise FileNotFoundError(f"kernel sources not found in {src} (set MOE_TRAIN_KERNELS_DIR)")
    sources = [str(src / "moe_ops.cpp")]
    cflags = ["-O3", "-fopenmp", f"-I{src}"]
    cuda_home = _cuda_home()
    kwargs: dict[str, object] = {}
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # torch would pick /usr/local for a wrapper nvcc
        cpp_extension.CUDA_HOME = cuda_home
        sources += [str(src / "moe_ops_cuda.cpp"), str(src / "moe_ops_cuda.cu")]
        # Toolkit headers first; the wheel's fill in what a minimal toolkit lacks.
        cflags += [f"-idirafter{p}" for p in _wheel_cuda_includes()]
        cflags.append("-DMOE_WITH_CUDA")
        kwargs["extra_cuda_cflags"] = ["-O3", f"-I{src}"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    kind = "cuda" if cuda_home is not None else "cpu"
    tag = f"torch{torch.__version__}_py{sys.version_info[0]}{sys.version_info[1]}_{kind}"
    build_dir = extension_dir() / tag.replace("+", "_")
    build_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(build_dir / "lock")
    if not (build_dir / f"moe_train_ops_{kind}.so").exists():  # the first run explains its pause
        print(
            f"moe-train: compiling the fused dispatch/combine kernels, once (~20 s on a CPU, "
            f"longer with CUDA), into {build_dir}",
            file=sys.stderr,
            flush=True,
        )
    cpp_extension.load(
        name=f"moe_train_ops_{kind}",
        sources=sources,
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
        **kwargs,
    )
    return cuda_home is not None


_STALE_LOCK_S = 600.0  # a build takes well under a minute; an older lock was left by a killed build


def _clear_stale_lock(lock: Path) -> None:
    """torch's build lock outlives a killed build and makes later builds wait forever."""
    try:
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink()
            warnings.warn(
                f"moe_train.ops: removed a stale build lock {lock}", RuntimeWarning, stacklevel=2
            )
    except FileNotFoundError:
        pass


def load(verbose: bool = False) -> bool:
    """Build/load once per process; True when the ops are registered. Never raises.

    On failure warns once, saying how to build, and the callers use the reference.
    """
    if _state["tried"]:
        return bool(_state["loaded"])
    with _lock:
        if _state["tried"]:
            return bool(_state["loaded"])
        try:
            if disabled():
                return False
            if _cxx() is None:
                raise RuntimeError("no C++ compiler found (looked for $CXX, c++, g++)")
            _state["cuda"] = _build(verbose)
            from . import _custom

            _custom.register()
            _state["loaded"] = True
        except Exception as e:  # noqa: BLE001 - any build problem means: use the reference
            _state["error"] = e
            msg = str(e).strip().splitlines()
            short = msg[-1] if msg else type(e).__name__
            warnings.warn(
                f"moe_train.ops: fused dispatch/combine kernels unavailable ({short}); "
                f"using the PyTorch reference ops. To build them, {_HOW_TO_BUILD}.",
                RuntimeWarning,
                stacklevel=3,
            )
        finally:
            _state["tried"] = True
    return bool(_state["loaded"])


def has_cuda() -> bool:
    """True when the loaded extension includes the CUDA kernels."""
    return bool(_state["loaded"]) and bool(_state["cuda"])


def main(argv: list[str] | None = None) -> int:
    """Build the extension ahead of time and report where it went."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = p.parse_args(argv)
    if disabled():
        print("MOE_TRAIN_NO_EXT is set: nothing to build")
        return 0
    print(f"building moe_train ops from {kernels_dir()} into {extension_dir()}")
    print(f"torch {torch.__version__}, CUDA kernels: {'yes' if _cuda_home() else 'no'}")
    t0 = time.perf_counter()
    try:
        cuda = _build(verbose=args.verbose)
    except Exception as e:  # noqa: BLE001
        print(f"build failed: {e}", file=sys.stderr)
        return 1
    ops = [
        n
        for n in ("csr_by_row", "dispatch", "dispatch_backward", "combine", "combine_backward")
        if hasattr(torch.ops.moe_train, n)
    ]
    print(f"built and loaded in {time.perf_counter() - t0:.1f} s (cuda={cuda}); ops: {ops}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
