"""What the run tools share (`moe-train-generate`, `-eval`, `-export`): one parent parser for the
run folder, the checkpoint and the device, and the one error line they exit with."""

from __future__ import annotations

import argparse
import sys


def run_arguments() -> argparse.ArgumentParser:
    """The parent parser (argparse `parents=`) of RUN_DIR, --checkpoint and --device."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (trainer.run_dir)")
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a checkpoint folder of the run, e.g. RUN_DIR/step_00000500 (default: the newest)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (GPU when there is one) | cpu | cuda (default: %(default)s)",
    )
    return p


def fail(prog: str, error: Exception) -> int:
    """Print `prog: error: ...` to stderr; the exit status of a run that cannot be used (2)."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2
