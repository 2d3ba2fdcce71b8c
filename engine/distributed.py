"""Process-group set-up under every launcher, and the few collectives the trainer needs.

Rank discovery, in order:
1. RANK / WORLD_SIZE / LOCAL_RANK already set: the `deepspeed` launcher (pdsh, `--no_ssh`), `torchrun`.
2. SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (a bare `srun`, or DeepSpeed's `--launcher slurm`, which
   sets none of the above); MASTER_ADDR from the environment or the first node of the job.
3. OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK (`mpirun`): DeepSpeed's mpi4py discovery finds the master.
4. Nothing: one process on this machine.
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
from pathlib import Path

import torch
import torch.distributed as torch_dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                               timeout=20, check=True).stdout.split()[0]
        info = subprocess.run(["scontrol", "show", "node", first], capture_output=True, text=True, timeout=20,
                              check=True).stdout
        for token in info.split():
            if token.startswith("NodeAddr="):
                return token.split("=", 1)[1]
        return first
    except (OSError, subprocess.SubprocessError, IndexError):
        return os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")


def map_launcher_env(env: dict | None = None) -> str:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK (and MASTER_*) from the launcher's variables; returns its name."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        return "env"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _slurm_master()
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
        return "slurm"
    if "OMPI_COMM_WORLD_RANK" in env:
        return "mpi"  # deepspeed.init_distributed(auto_mpi_discovery=True) fills the rest
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return "single"


def init(timeout_s: int = 300) -> tuple[int, int, int]:
    """Start the process group (gloo on CPU, nccl on GPUs); returns (rank, world_size, local_rank)."""
    import deepspeed

    launcher = map_launcher_env()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=launcher == "mpi",
                                   timeout=dt.timedelta(seconds=timeout_s), verbose=False)
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    else:
        _unlink_shm_allreduce_buffer(rank, world)
    return rank, world, local


SHM_DIR = Path("/dev/shm")


def shm_allreduce_buffer(rank: int) -> Path:
    """The file DeepSpeed's CPU allreduce creates for `rank` when all ranks share one machine (its shm.cpp:
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, about 67 MB)."""
    return SHM_DIR / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                      f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def _unlink_shm_allreduce_buffer(rank: int, world: int) -> None:
    """DeepSpeed never removes its CPU allreduce files, so every CPU run on one machine left world x 67 MB of
    RAM-backed /dev/shm behind (22 GB here after a day of test runs, until the machine ran out of memory). Each
    rank maps every rank's file while the process group starts; after a barrier all have, and the names are no
    longer needed: each rank unlinks its own, so nothing is left even if the job is killed later."""
    if world > 1:
        torch_dist.barrier()
    try:
        shm_allreduce_buffer(rank).unlink()
    except FileNotFoundError:
        pass


def all_reduce(values: list[float], op: str = "sum", device: torch.device | None = None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM if op == "sum" else torch_dist.ReduceOp.MAX)
    return t.tolist()


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (a list of one without a process group)."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        out = [None] * torch_dist.get_world_size()
        torch_dist.all_gather_object(out, obj)
        return out
    return [obj]


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def barrier() -> None:
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.barrier()


def shutdown() -> None:
    """End the process group (without it about 1 run in 5 aborted at exit here) and DeepSpeed's cached
    copy of it, so a later run in the same process starts clean."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    from deepspeed.utils import groups

    groups._WORLD_GROUP = None
