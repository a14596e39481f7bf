"""Shared helpers for the benchmark scripts: machine description, JSON output, tables, medians."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK_DIR = RESULTS_DIR / "quick"  # --quick runs land here (git-ignored), never over the results


def results_dir(out: str | Path | None, quick: bool) -> Path:
    """Where a run writes its JSON: --out if given, else results/ (results/quick/ with --quick)."""
    return Path(out) if out else (QUICK_DIR if quick else RESULTS_DIR)


def add_output_args(p: argparse.ArgumentParser, quick_help: str) -> None:
    """--quick (a CI-sized run) and --out (the JSON's folder), the same in every script."""
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the JSON (default benchmarks/results/; with --quick results/quick/)",
    )


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """p.parse_args(argv) with `out` resolved by results_dir (never None afterwards)."""
    a = p.parse_args(argv)
    a.out = results_dir(a.out, a.quick)
    return a


def gpu_missing(device: str) -> bool:
    """True, and says the run is skipped, when --device cuda is asked for but no GPU is visible."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print("skipped: --device cuda but no GPU is visible")
        return True
    return False


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    """What the numbers were measured on (with device "cuda": also the GPU and its capability)."""
    import torch

    out = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "loadavg_1m": os.getloadavg()[0],  # the machine may be shared: > cores means contention
    }
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return out


def machine_line(m: dict | None = None) -> str:
    m = m or machine()
    gpu = f", {m['gpu']} (sm {m['capability']})" if m.get("gpu") else ""
    return (
        f"machine: {m['cpu']}, {m['cores']} cores{gpu}, torch {m['torch']} "
        f"({m['torch_threads']} threads), python {m['python']}, {m['date']}, "
        f"load average {m['loadavg_1m']:.1f}"
    )


def write_json(name: str, payload: dict, out_dir: str | Path | None = None) -> Path:
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def command_line() -> str:
    """How this benchmark was started (stored with its results)."""
    return " ".join(["python", *sys.argv])


def print_table(headers: list[str], rows: list[list]) -> None:
    print()
    print(table(headers, rows))


def publish(name: str, mach: dict, fields: dict, out_dir: str | Path | None = None) -> dict:
    """Write {benchmark, machine, command, **fields} to <out_dir>/<name>.json, say where, and
    return it (the shared tail of every benchmark script)."""
    payload = {"benchmark": name, "machine": mach, "command": command_line(), **fields}
    path = write_json(name, payload, out_dir)
    print(f"\nwrote {path}")
    return payload


def table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-markdown table (also readable on a terminal)."""

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
