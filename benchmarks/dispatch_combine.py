"""Benchmark of the fused dispatch/combine kernels against the PyTorch reference (CPU or GPU).

For T tokens, width d and k slots per token (S = k*T slots, random routing), times dispatch and
combine, forward and backward (as autograd runs it), for the extension and the reference, plus a
plain ``torch`` copy of an [S, d] tensor as the memory-bandwidth ceiling, interleaved in the same
run; reports medians, GB/s (bytes read + written) and the fraction of the copy's GB/s. The
ceiling ("copy") is ``clone()``, which allocates its output like the ops (on CPU, first-touch page
faults of a fresh large output cost as much as the copy); ``copy_`` into a preallocated tensor is
listed too.

    python benchmarks/dispatch_combine.py [--quick] [--dtype bfloat16] [--reps 7]
    python benchmarks/dispatch_combine.py --device cuda   # bf16, larger sizes, CUDA events

On CPU the times are the process's CPU time (`--clock cpu`, the default with one thread: time
spent computing, not waiting for a core of a shared machine); on the GPU, CUDA events, and the
ceiling is a device-to-device copy (`clone`) of the same [S, d] tensor.

Writes dispatch_combine.json to --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _common import (  # benchmarks/ is on sys.path when run as a script
    add_output_args,
    gpu_missing,
    machine,
    machine_line,
    parse_args,
    publish,
)

from moe_train import ops
from moe_train.ops.reference import combine_reference, dispatch_reference

FULL = {"T": (4096, 16384, 65536), "d": (512, 2048, 4096), "k": (1, 2)}
QUICK = {"T": (4096,), "d": (512, 1024), "k": (1, 2)}
FULL_CUDA = {"T": (16384, 65536), "d": (2048, 4096), "k": (1, 2, 6)}
QUICK_CUDA = {"T": (16384,), "d": (2048,), "k": (2,)}
MAX_BUF_BYTES = {"cpu": 64 * 2**20, "cuda": 4 * 2**30}  # skip larger [S, d] buffers


def cases(
    T: int, d: int, k: int, dtype: torch.dtype, dev: str = "cpu"
) -> dict[str, tuple[Callable, Callable, int]]:
    """name -> (extension fn, reference fn, bytes moved); the fns take no arguments."""
    S = k * T
    esize = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(T, d, device=dev).to(dtype).requires_grad_()
    index = torch.randperm(S, device=dev) % T  # k slots per token, shuffled as routing would
    w = torch.rand(S, device=dev, requires_grad=True)
    buf = torch.randn(S, d, device=dev).to(dtype).requires_grad_()
    g_buf = torch.randn(S, d, device=dev).to(dtype)
    g_y = torch.randn(T, d, device=dev).to(dtype)

    def backward(fwd: Callable, inputs: tuple, grad: torch.Tensor) -> Callable:
        out = fwd()
        return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)

    sd, td = S * d * esize, T * d * esize
    return {
        "dispatch fwd": (
            lambda: ops.dispatch(x, index),
            lambda: dispatch_reference(x, index),
            2 * sd,
        ),
        "dispatch bwd": (
            backward(lambda: ops.dispatch(x, index), (x,), g_buf),
            backward(lambda: dispatch_reference(x, index), (x,), g_buf),
            sd + td,
        ),
        "combine fwd": (
            lambda: ops.combine(buf, w, index, T),
            lambda: combine_reference(buf, w, index, T),
            sd + td,
        ),
        "combine bwd": (
            backward(lambda: ops.combine(buf, w, index, T), (buf, w), g_y),
            backward(lambda: combine_reference(buf, w, index, T), (buf, w), g_y),
            3 * sd,  # read grad_y rows (S of them) and buf, write grad_buf
        ),
    }


def timer(clock: str) -> Callable[[Callable], float]:
    """Seconds of one call: CUDA events ('cuda'), CPU time of the process ('cpu') or wall time."""
    if clock == "cuda":

        def on_gpu(fn: Callable) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return on_gpu
    now = time.process_time if clock == "cpu" else time.perf_counter

    def on_cpu(fn: Callable) -> float:
        t0 = now()
        fn()
        return now() - t0

    return on_cpu


def copies(S: int, d: int, dtype: torch.dtype, dev: str = "cpu") -> tuple[Callable, Callable, int]:
    """The ceiling: a plain torch copy of an [S, d] tensor, allocating its output like the ops do
    (clone), and into a preallocated tensor (copy_, no page faults); bytes read + written."""
    src = torch.randn(S, d, device=dev).to(dtype)
    dst = torch.empty_like(src)
    return src.clone, lambda: dst.copy_(src), 2 * src.numel() * src.element_size()


def run(grid: dict, dtype: torch.dtype, reps: int, dev: str = "cpu", clock: str = "wall") -> list:
    rows = []
    esize = torch.tensor([], dtype=dtype).element_size()
    timed = timer(clock)
    for T in grid["T"]:
        for d in grid["d"]:
            for k in grid["k"]:
                if k * T * d * esize > MAX_BUF_BYTES[dev]:
                    continue
                clone, copy_, copy_bytes = copies(k * T, d, dtype, dev)
                for name, (ext, ref, nbytes) in cases(T, d, k, dtype, dev).items():
                    fns = {"ext": ext, "ref": ref, "clone": clone, "copy_": copy_}
                    times: dict[str, list[float]] = {key: [] for key in fns}
                    for fn in fns.values():  # warm-up
                        fn()
                    for _ in range(reps):  # interleaved
                        for key, fn in fns.items():
                            times[key].append(timed(fn))
                    med = {key: statistics.median(v) for key, v in times.items()}
                    copy_gbs = copy_bytes / med["clone"] / 1e9
                    row = {"T": T, "d": d, "k": k, "op": name, "bytes": nbytes}
                    for key in ("ext", "ref"):
                        gbs = nbytes / med[key] / 1e9
                        row[f"{key}_ms"] = med[key] * 1e3
                        row[f"{key}_GBps"] = gbs
                        row[f"{key}_frac_copy"] = gbs / copy_gbs
                    row["copy_GBps"] = copy_gbs
                    row["copy_noalloc_GBps"] = copy_bytes / med["copy_"] / 1e9
                    row["speedup"] = med["ref"] / med["ext"]
                    rows.append(row)
                    print(fmt_row(row), flush=True)
    return rows


HEADER = (
    f"{'T':>6} {'d':>5} {'k':>2} {'op':<13} {'ext ms':>8} {'ext GB/s':>9} {'ext/copy':>8} "
    f"{'ref ms':>8} {'ref GB/s':>9} {'ref/copy':>8} {'copy GB/s':>9} {'copy_ GB/s':>10} "
    f"{'speedup':>7}"
)


def fmt_row(r: dict) -> str:
    return (
        f"{r['T']:>6} {r['d']:>5} {r['k']:>2} {r['op']:<13} {r['ext_ms']:>8.2f} "
        f"{r['ext_GBps']:>9.2f} {r['ext_frac_copy']:>8.2f} {r['ref_ms']:>8.2f} "
        f"{r['ref_GBps']:>9.2f} {r['ref_frac_copy']:>8.2f} {r['copy_GBps']:>9.2f} "
        f"{r['copy_noalloc_GBps']:>10.2f} {r['speedup']:>6.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (median)")
    p.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--clock",
        default=None,
        choices=["cpu", "wall"],
        help="CPU device: process CPU time (default with --threads 1) or wall time",
    )
    add_output_args(p, "CI-sized run")
    args = parse_args(p, argv)
    dtype = getattr(torch, args.dtype)
    reps = args.reps or (3 if args.quick else (20 if args.device == "cuda" else 5))
    if args.threads:
        torch.set_num_threads(args.threads)
    if gpu_missing(args.device):
        return 0
    clock = "cuda" if args.device == "cuda" else args.clock
    if clock is None:
        clock = "cpu" if torch.get_num_threads() == 1 else "wall"
    if not ops.extension_available():
        print("skipped: the extension is not available, nothing to compare (see the warning above)")
        return 0
    mach = machine(args.device)
    print(f"{machine_line(mach)}; dtype {args.dtype}; median of {reps}; clock {clock}")
    print(HEADER)
    if args.device == "cuda":
        grid = QUICK_CUDA if args.quick else FULL_CUDA
    else:
        grid = QUICK if args.quick else FULL
    rows = run(grid, dtype, reps, args.device, clock)
    name = "dispatch_combine" if args.device == "cpu" else "dispatch_combine_cuda"
    publish(name, mach, {"dtype": args.dtype, "reps": reps, "clock": clock, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
