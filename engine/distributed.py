"""Process-group set-up under every launcher, and the few collectives the trainer needs.

Rank discovery, in order:
1. RANK / WORLD_SIZE / LOCAL_RANK already set: the `deepspeed` launcher (pdsh, `--no_ssh`), `torchrun`.
2. SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (a bare `srun`, or DeepSpeed's `--launcher slurm`, which
   sets none of the above); MASTER_ADDR from the environment or the first node of the job.
3. OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK (`mpirun`): DeepSpeed's mpi4py discovery finds the master.
4. Nothing: one process on this machine.

Timeouts: every collective of a run, DeepSpeed's included, gives up after `train.dist_timeout_s` (gloo on CPU
raises "Timed out waiting ..."), so a rank that stops answering (hung, SIGSTOP-ed, its node lost) ends the
others. torch gives a group made later without a timeout (`new_group()`) its 30-minute default instead of the
world group's; DeepSpeed reduces gradients and gathers ZeRO partitions on such a group (its clone of the world
group), so `init` makes that clone with the run's timeout and makes the run's timeout the default for any later
group. (DeepSpeed's shared-memory CPU allreduce, which would spin without a timeout, serves only its inference
`inference_all_reduce`: training never calls it.) After a collective times out, `unresponsive_ranks` tells
which ranks stopped answering.
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import threading
import time
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
    timeout = dt.timedelta(seconds=timeout_s)
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=launcher == "mpi", timeout=timeout,
                                   verbose=False)
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    _every_group_times_out(timeout, world)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    else:
        _unlink_shm_allreduce_buffer(rank, world)
    return rank, world, local


def _every_group_times_out(timeout: dt.timedelta, world: int) -> None:
    """Groups made from now on without a timeout get `timeout`, not torch's 30-minute default; DeepSpeed's clone
    of the world group (its data-parallel group: ZeRO's gradient reduce and parameter gather) is made here with it.
    Measured on 2 gloo ranks under the deepspeed launcher, dist_timeout_s 15, one rank stopped with SIGSTOP during
    backward: without this the other was still waiting in ZeRO's gradient all-reduce 90 s later (the clone's 30
    minutes govern); with it, it raised after 15 s."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout
    from deepspeed.utils import groups

    if groups._WORLD_GROUP is None:
        groups._WORLD_GROUP = torch_dist.new_group(ranks=list(range(world)), timeout=timeout)


# the words gloo's (and the TCP store's) errors use when a peer does not answer in time or went away
_PEER_LOST = ("Timed out waiting", "timed out", "Connection closed by peer", "Connection reset by peer",
              "Broken pipe", "Socket Timeout")


def is_peer_lost(e: BaseException) -> bool:
    """Whether `e`, raised by a collective, means another rank did not answer (timed out, or went away)."""
    return isinstance(e, RuntimeError) and any(w in str(e) for w in _PEER_LOST)


def unresponsive_ranks(wait_s: float = 5.0) -> list[int] | None:
    """After a collective failed for want of an answer: the ranks that do not answer. Each rank that gets here
    checks in at the job's store (the rendezvous one) and waits up to `wait_s` for the others; the ranks that
    never check in are the ones that stopped. None where the store does not answer itself: under the deepspeed
    launcher it lives in rank 0's process, so rank 0 (or its node) is the one. The store's client waits without
    a timeout for a stopped server, so the asking runs in a thread that is given up after `wait_s` + 2 s."""
    if not torch_dist.is_initialized():
        return None
    answer: list[list[int]] = []

    def ask() -> None:
        store = torch_dist.distributed_c10d._get_default_store()
        me, world = torch_dist.get_rank(), torch_dist.get_world_size()
        store.set(f"dupmae/answering/{me}", "1")
        waiting, deadline = set(range(world)) - {me}, time.monotonic() + wait_s
        while waiting and time.monotonic() < deadline:
            waiting = {r for r in waiting if not store.check([f"dupmae/answering/{r}"])}
            if waiting:
                time.sleep(0.2)
        answer.append(sorted(waiting))

    asking = threading.Thread(target=ask, name="dupmae-who-answers", daemon=True)
    asking.start()
    asking.join(wait_s + 2)
    return answer[0] if answer else None


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
