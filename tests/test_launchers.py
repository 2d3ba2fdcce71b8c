"""`dupmae pretrain` runs under launchers that set no RANK: a bare Slurm srun, and mpirun (mpi4py)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from dupmae.engine.distributed import map_launcher_env

BIN = Path(sys.executable).parent


@pytest.fixture
def recipe(tmp_path, tiny_recipe):
    return tiny_recipe(tmp_path / "tiny.toml", tmp_path / "unused", train={"max_steps": 3, "dist_timeout_s": 60},
                       logging={"every": 1, "tensorboard": False})


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMIX_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                           "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_slurm_variables_are_mapped_when_rank_is_absent():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "10.0.0.1"}
    assert map_launcher_env(env) == "slurm"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("3", "8", "1", "10.0.0.1")
    assert env["MASTER_PORT"].isdigit()
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert map_launcher_env(env) == "env" and env["RANK"] == "1"  # a launcher's own RANK wins
    env = {}
    assert map_launcher_env(env) == "single" and env["WORLD_SIZE"] == "1"


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_processes_with_only_slurm_variables(recipe, tmp_path):
    """What `srun --ntasks 2 dupmae pretrain ...` (or deepspeed --launcher slurm) hands each task."""
    port = free_port()
    procs = []
    for r in range(2):
        env = _clean_env() | {"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                              "SLURM_JOB_ID": "4242", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([str(BIN / "dupmae"), "pretrain", "-c", str(recipe),
                                       f"train.run_dir={tmp_path / 'run'}"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "2 rank(s), global batch 8" in outs[0]
    assert _steps(tmp_path / "run") == [1, 2, 3]


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (Debian: openmpi-bin; "
                    "scripts/test.sh installs it when run as root)")
def test_mpirun_with_mpi4py_discovery(recipe, tmp_path):
    env = _clean_env() | {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    out = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "OMP_NUM_THREADS",
                          "-x", "PATH", str(BIN / "dupmae"), "pretrain", "-c", str(recipe),
                          f"train.run_dir={tmp_path / 'run'}"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 rank(s), global batch 8" in out.stdout + out.stderr
    assert _steps(tmp_path / "run") == [1, 2, 3]
