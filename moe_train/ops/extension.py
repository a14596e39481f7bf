"""Build and load the fused dispatch/combine extension (kernels/) with torch.utils.cpp_extension.

Where: ``$MOE_TRAIN_EXT_DIR``, else ``$TORCH_EXTENSIONS_DIR/moe_train`` (the Docker image sets it
to the folder it ships the built kernels in), else ``~/.cache/moe_train/extensions``; one folder
per torch build, Python version, kind (cpu/cuda) and CUDA targets.

- Prebuilt: a folder whose stamp matches the sources, the flags and the torch build is loaded as
  it is: no compiler, no writes (read-only images under Apptainer or pyxis work).
- One build at a time: processes sharing the folder (all ranks of a job on a shared ``$HOME``)
  take a file lock around the build; the others wait, then load what it built.
- CUDA kernels are built when torch has CUDA and a GPU is visible, or ahead of time when
  ``TORCH_CUDA_ARCH_LIST`` names the targets (a GPU-less build host), with the toolkit of
  ``$CUDA_HOME`` or of ``nvcc`` on PATH.
- Failure: on a machine with CUDA the run stops with the compiler's error (the reference combine's
  ``index_add`` is not deterministic on CUDA; set ``MOE_TRAIN_NO_EXT=1`` to run the references
  anyway). On a CPU-only machine one warning says how to build, and the references run.

Ahead of time (e.g. in a Docker image): ``python -m moe_train.ops.extension [--verbose]``;
``--check`` loads the prebuilt kernels without building (exit 1 when there are none).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_HOW_TO_BUILD = (
    "install a C++ compiler (e.g. `apt-get install g++`) and run `python -m moe_train.ops.extension` "
    "to see the build output; set MOE_TRAIN_NO_EXT=1 to use the reference ops without this warning"
)
_HOW_TO_OPT_OUT = (
    "Fix the build (`python -m moe_train.ops.extension --verbose` shows the compiler commands), or set "
    "MOE_TRAIN_NO_EXT=1 to run the PyTorch reference ops instead (slower; their combine uses "
    "index_add, which is not deterministic on CUDA)."
)
_STAMP = "moe_train_ops.stamp.json"
CPU_SOURCES = ("moe_ops.cpp", "moe_gate_cpu.cpp", "moe_segment_mm_cpu.cpp")
_LOCK = "moe_train_ops.lock"

_lock = threading.Lock()
_state: dict[str, object] = {
    "tried": False, "loaded": False, "cuda": False, "error": None, "path": None, "prebuilt": False,
}  # fmt: skip


class ExtensionBuildError(RuntimeError):
    """The kernels failed to build on a machine with CUDA (the message carries the compiler's)."""


def kernels_dir() -> Path:
    """Directory of the C++/CUDA sources (``$MOE_TRAIN_KERNELS_DIR`` or the repo's kernels/)."""
    env = os.environ.get("MOE_TRAIN_KERNELS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "kernels"


def extension_dir() -> Path:
    """Root of the build cache: $MOE_TRAIN_EXT_DIR, $TORCH_EXTENSIONS_DIR/moe_train or ~/.cache."""
    if env := os.environ.get("MOE_TRAIN_EXT_DIR"):
        return Path(env)
    if env := os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(env) / "moe_train"
    return Path.home() / ".cache" / "moe_train" / "extensions"


def disabled() -> bool:
    return os.environ.get("MOE_TRAIN_NO_EXT", "0") not in ("", "0")


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _cuda_home() -> str | None:
    """The CUDA toolkit to build with ($CUDA_HOME, $CUDA_PATH or nvcc's), None without nvcc."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None:
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            return None
        home = str(Path(nvcc).resolve().parents[1])
    return home if (Path(home) / "bin" / "nvcc").exists() else None


def cuda_wanted() -> bool:
    """Build the CUDA kernels? torch has CUDA and a GPU is visible or TORCH_CUDA_ARCH_LIST is set."""
    if torch.version.cuda is None:
        return False
    return torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))


def _arch_list() -> str:
    """CUDA targets: $TORCH_CUDA_ARCH_LIST, else the visible GPUs' compute capabilities."""
    if env := os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return env
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))


def _wheel_cuda_includes() -> list[str]:
    """CUDA headers shipped with torch's nvidia-* wheels (e.g. site-packages/nvidia/cu13/include)."""
    import glob

    site = Path(torch.__file__).resolve().parents[1]
    pats = ["nvidia/cu*/include", "nvidia/cuda_runtime/include"]
    return sorted(p for pat in pats for p in glob.glob(str(site / pat)))


def cpu_simd_flags() -> list[str]:
    """at::vec with AVX2 + FMA where torch itself runs AVX2 or AVX-512 kernels on this x86-64 CPU
    (torch.backends.cpu.get_cpu_capability, which honours ATEN_CPU_CAPABILITY); the portable
    at::vec code elsewhere. The flags are part of the stamp, so a library built with them is
    never loaded on a CPU without them."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return []
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


@dataclass
class ExtensionBuild:
    """Everything that decides the built library: sources, flags, targets, torch build."""

    kind: str  # "cpu" or "cuda"
    sources: list[str]
    cflags: list[str]
    cuda_cflags: list[str] = field(default_factory=list)
    arch_list: str = ""  # CUDA targets, e.g. "7.0;8.0;9.0"
    cuda_home: str | None = None

    @property
    def with_cuda(self) -> bool:
        """Does the library hold the CUDA kernels (a toolkit was found for it)?"""
        return self.cuda_home is not None

    @property
    def name(self) -> str:
        return f"moe_train_ops_{self.kind}"

    @property
    def build_dir(self) -> Path:
        tag = f"torch{torch.__version__}_py{sys.version_info[0]}{sys.version_info[1]}_{self.kind}"
        if "-DCPU_CAPABILITY_AVX2" in self.cflags:
            tag += "_avx2"
        if self.arch_list:
            archs = "-".join(
                a.replace(".", "") for a in self.arch_list.replace(" ", ";").split(";")
            )
            tag += f"_sm{archs}"
        return extension_dir() / tag.replace("+", "_")

    @property
    def library(self) -> Path:
        return self.build_dir / f"{self.name}.so"

    def stamp(self) -> dict[str, object]:
        """What a prebuilt library must match to be loaded without building."""
        src = kernels_dir()
        digest = hashlib.sha256()
        for path in sorted(p for p in src.iterdir() if p.suffix in (".cpp", ".cu", ".h", ".cuh")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return {
            "sources_sha256": digest.hexdigest(),
            "torch": torch.__version__,
            "torch_git": getattr(torch.version, "git_version", ""),
            "torch_cuda": torch.version.cuda,
            "python": list(sys.version_info[:2]),
            "kind": self.kind,
            "arch_list": self.arch_list,
            "cflags": self.cflags,
            "cuda_cflags": self.cuda_cflags,
        }


def resolve_build() -> ExtensionBuild:
    """What to build here; raises when CUDA kernels are wanted but there is no toolkit."""
    src = kernels_dir()
    if not (src / "moe_ops.cpp").exists():
        raise FileNotFoundError(f"kernel sources not found in {src} (set MOE_TRAIN_KERNELS_DIR)")
    # -ffp-contract=off: the jitter op matches torch's elementwise reference bit for bit
    cflags = ["-O3", "-fopenmp", "-ffp-contract=off", f"-I{src}", *cpu_simd_flags()]
    if not cuda_wanted():
        return ExtensionBuild("cpu", [str(src / f) for f in CPU_SOURCES], cflags)
    cuda_home = _cuda_home()
    if cuda_home is None:
        raise RuntimeError(
            f"torch has CUDA {torch.version.cuda} and CUDA kernels are wanted (a GPU is visible "
            "or TORCH_CUDA_ARCH_LIST is set), but no CUDA toolkit was found: set CUDA_HOME or "
            "put nvcc on PATH"
        )
    sources = [str(src / f) for f in (*CPU_SOURCES, "moe_ops_cuda.cpp", "moe_ops_cuda.cu")]
    # Toolkit headers first; the wheel's fill in what a minimal toolkit lacks.
    cflags += [f"-idirafter{p}" for p in _wheel_cuda_includes()] + ["-DMOE_WITH_CUDA"]
    return ExtensionBuild("cuda", sources, cflags, ["-O3", f"-I{src}"], _arch_list(), cuda_home)


def _prebuilt(p: ExtensionBuild) -> bool:
    """True when the folder holds a library built from exactly this build."""
    try:
        stamp = json.loads((p.build_dir / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp == p.stamp() and p.library.is_file()


def _acquire(f, path: Path) -> bool:
    """Take the exclusive lock on open file ``f``, waiting (and saying so) while another holds it.

    False (with a warning) on a file system without locks, e.g. Lustre mounted without flock."""
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            print(
                f"moe_train.ops: waiting for {holder} to finish building the kernels in "
                f"{path.parent}",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(f, fcntl.LOCK_EX)
    except OSError as e:
        warnings.warn(
            f"moe_train.ops: no file lock on {path} ({e}); building without one",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    return True


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """An exclusive file lock shared by every process (and node) using this build folder.

    The kernel drops it when the holder dies, so a killed build never blocks the next one."""
    with open(path, "a+") as f:
        locked = _acquire(f, path)
        if locked:
            f.truncate(0)
            f.write(f"{socket.gethostname()} pid {os.getpid()}\n")
            f.flush()
        try:
            yield
        finally:
            if locked:
                f.truncate(0)
                fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _compile(p: ExtensionBuild, verbose: bool) -> None:
    """Compile the library into its folder and load it (the caller holds the build lock)."""
    from torch.utils import cpp_extension

    if _cxx() is None:
        raise RuntimeError("no C++ compiler found (looked for $CXX, c++, g++)")
    (p.build_dir / _STAMP).unlink(missing_ok=True)
    (p.build_dir / "lock").unlink(missing_ok=True)  # torch's own; stale, since we hold ours
    print(  # the first run explains its pause
        f"moe-train: compiling the fused dispatch/combine kernels, once (~20 s on a CPU, "
        f"longer with CUDA), into {p.build_dir}",
        file=sys.stderr,
        flush=True,
    )
    env: dict[str, str] = {}
    kwargs: dict[str, Any] = {}
    if p.with_cuda:
        assert p.cuda_home is not None
        env = {"CUDA_HOME": p.cuda_home, "TORCH_CUDA_ARCH_LIST": p.arch_list}
        cpp_extension.CUDA_HOME = p.cuda_home  # torch would pick /usr/local for a wrapper nvcc
        kwargs["extra_cuda_cflags"] = p.cuda_cflags
    with _environ(**env):
        cpp_extension.load(
            name=p.name,
            sources=p.sources,
            extra_cflags=p.cflags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(p.build_dir),
            is_python_module=False,
            verbose=verbose,
            **kwargs,
        )


def _write_stamp(p: ExtensionBuild) -> None:
    """Mark the folder's library as built from ``p`` (atomically: readers take no lock)."""
    tmp = p.build_dir / f"{_STAMP}.{os.getpid()}"
    tmp.write_text(json.dumps(p.stamp(), indent=1))
    tmp.replace(p.build_dir / _STAMP)


def _build(verbose: bool, build: bool = True) -> ExtensionBuild:
    """Load the prebuilt library of this build, else (when ``build``) compile it under the lock."""
    p = resolve_build()
    prebuilt = _prebuilt(p)
    if not prebuilt and build:
        p.build_dir.mkdir(parents=True, exist_ok=True)
        with _build_lock(p.build_dir / _LOCK):
            prebuilt = _prebuilt(p)  # built by the holder we waited for
            if not prebuilt:
                _compile(p, verbose)
                _write_stamp(p)
    if prebuilt:
        torch.ops.load_library(str(p.library))
    elif not build:
        raise FileNotFoundError(f"no up-to-date prebuilt kernels in {p.build_dir}")
    _state.update(cuda=p.with_cuda, path=p.library, prebuilt=prebuilt)
    return p


def _must_fail() -> bool:
    """A failed build stops the run on a machine with CUDA (no silent fallback on a GPU)."""
    return torch.cuda.is_available()


def _gpu_error(e: BaseException) -> ExtensionBuildError:
    return ExtensionBuildError(
        "moe_train.ops: the fused dispatch/combine kernels failed to build or load on a machine "
        f"with CUDA:\n{e}\n{_HOW_TO_OPT_OUT}"
    )


def load(verbose: bool = False) -> bool:
    """Build/load once per process; True when the ops are registered.

    On failure: raises ExtensionBuildError on a machine with CUDA (every call); otherwise warns
    once, saying how to build, and returns False so that the callers use the reference.
    """
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _try_load(verbose)
    if _state["error"] is not None and _must_fail():
        raise _gpu_error(_state["error"])  # type: ignore[arg-type]
    return bool(_state["loaded"])


def _try_load(verbose: bool) -> None:
    try:
        if disabled():
            return
        _build(verbose)
        from . import _custom

        _custom.register()
        _state["loaded"] = True
    except Exception as e:  # noqa: BLE001 - on CPU any build problem means: use the reference
        _state["error"] = e
        if not _must_fail():
            msg = str(e).strip().splitlines()
            short = msg[-1] if msg else type(e).__name__
            warnings.warn(
                f"moe_train.ops: fused dispatch/combine kernels unavailable ({short}); "
                f"using the PyTorch reference ops. To build them, {_HOW_TO_BUILD}.",
                RuntimeWarning,
                stacklevel=4,
            )
    finally:
        _state["tried"] = True


def has_cuda() -> bool:
    """True when the loaded extension includes the CUDA kernels."""
    return bool(_state["loaded"]) and bool(_state["cuda"])


def library_path() -> Path | None:
    """The loaded library, or None."""
    return _state["path"] if _state["loaded"] else None  # type: ignore[return-value]


def loaded_prebuilt() -> bool:
    """True when the loaded library was found built (by the image, or another rank)."""
    return bool(_state["loaded"]) and bool(_state["prebuilt"])


def main(argv: list[str] | None = None) -> int:
    """Build the extension ahead of time (or check the prebuilt one) and report where it is."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--verbose", action="store_true", help="show the compiler commands")
    p.add_argument("--check", action="store_true", help="load the prebuilt kernels, never build")
    args = p.parse_args(argv)
    if disabled():
        print("MOE_TRAIN_NO_EXT is set: nothing to build")
        return 0
    t0 = time.perf_counter()
    try:
        bp = _build(verbose=args.verbose, build=not args.check)
    except Exception as e:  # noqa: BLE001
        print(
            f"moe_train.ops.extension: {'check' if args.check else 'build'} failed: {e}",
            file=sys.stderr,
        )
        return 1
    ops = [
        n
        for n in (
            "csr_by_row",
            "dispatch",
            "dispatch_backward",
            "combine",
            "combine_backward",
            "jitter",
            "gate",
            "gate_backward",
            "segment_mm",
            "segment_mm_t",
        )  # fmt: skip
        if hasattr(torch.ops.moe_train, n)
    ]
    how = "prebuilt, loaded" if _state["prebuilt"] else "built and loaded"
    archs = f", CUDA targets {bp.arch_list}" if bp.with_cuda else ""
    print(f"torch {torch.__version__}: {bp.kind} kernels{archs}, from {kernels_dir()}")
    print(f"{how} in {time.perf_counter() - t0:.1f} s: {bp.library}; ops: {ops}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
