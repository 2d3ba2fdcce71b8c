"""The launchers on a real cluster: two network-namespace nodes with real Slurm, munge, sshd and pdsh
(tests/localcluster.py), 2 ranks (one per node) training the tiny recipe over gloo.

Runs are compared through RUN_DIR/metrics.jsonl with one uninterrupted sbatch job of the same recipe
(`reference`): on CPU in fp32 the same world size gives bit-identical losses whatever launched the ranks
and however often the job was stopped and resumed, dropout included. Every launcher call is wrapped in
`timeout`, every job is submitted with a time limit, and every test has a pytest timeout."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port
from localcluster import (REREGISTER_PERIOD_S, TERMINAL_STATES, LocalCluster, _cmdline,
                          local_cluster)  # noqa: F401 (a fixture)

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
PER_NODE = ROOT / "cluster" / "slurm" / "pretrain.sbatch"
DSLAUNCHER = ROOT / "cluster" / "slurm" / "pretrain-dslauncher.sbatch"
BIN = Path(sys.executable).parent
STEPS = 40  # long enough (several seconds of steps) to be signalled or lose a node mid-run


@dataclass
class Work:
    dir: Path  # jobs run here (their logs and dupmae-jobs/ land here)
    recipe: Path


@dataclass
class Job:
    id: str
    info: dict
    log: str


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_recipe) -> Work:
    d = tmp_path_factory.mktemp("cluster-runs")
    recipe = tiny_recipe(d / "tiny.toml", d / "unused", train={"max_steps": STEPS, "dist_timeout_s": 60},
                         checkpoint={"every": 1000, "keep_last": 2})
    return Work(d, recipe)


def submit(cluster: LocalCluster, work: Work, script: Path, *overrides: str) -> str:
    return cluster.sbatch(["--time=6", str(script), str(work.recipe), *overrides], cwd=work.dir)


def job_log(work: Work, job_id: str) -> str:
    found = list(work.dir.glob(f"*-{job_id}.log"))
    return found[0].read_text(errors="replace") if found else ""


def finish(cluster: LocalCluster, work: Work, job_id: str, timeout: float = 240) -> Job:
    info = cluster.wait_job(job_id, timeout)
    return Job(job_id, info, job_log(work, job_id))


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run)}  # the last record of a step wins (a resumed run)


def wait_for(predicate, timeout: float, what: str, details=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f} s\n{details()}")
        time.sleep(0.1)


def latest_complete(run: Path) -> str | None:
    pointer = run / "checkpoints" / "latest_complete"
    return pointer.read_text().strip() if pointer.exists() else None


@pytest.fixture(scope="module")
def reference(local_cluster, work) -> tuple[Job, Path]:
    """The uninterrupted job: `sbatch cluster/slurm/pretrain.sbatch` on both nodes."""
    run = work.dir / "reference"
    job = finish(local_cluster, work, submit(local_cluster, work, PER_NODE, f"train.run_dir={run}"))
    return job, run


@pytest.mark.timeout(300)
def test_sbatch_job_trains_on_both_nodes(local_cluster, reference):
    job, run = reference
    assert (job.info["JobState"], job.info["ExitCode"], job.info["NumNodes"]) == ("COMPLETED", "0:0", "2"), job.log[-3000:]
    assert "2 node(s) x 1 rank(s)" in job.log and "[pretrain] 2 rank(s)" in job.log
    assert "node_rank=0" in job.log and "node_rank=1" in job.log  # one deepspeed launcher per node
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    assert latest_complete(run) == f"step{STEPS}"
    marker = json.loads((run / "checkpoints" / f"step{STEPS}" / "dupmae_complete.json").read_text())
    assert marker["world_size"] == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == list(range(1, STEPS + 1))


@pytest.mark.timeout(300)
def test_launch_over_pdsh_with_a_two_host_hostfile(local_cluster, work, reference):
    """`dupmae launch --hostfile` from the head machine: pdsh + ssh start one launcher per node; ZeRO-2."""
    n1, n2 = local_cluster.nodes
    hostfile = work.dir / "hosts"
    hostfile.write_text(f"# the two namespace nodes\n{n1.name} slots=1\n{n2.name} slots=1\n")
    run = work.dir / "pdsh"
    out = subprocess.run(["timeout", "240", str(BIN / "dupmae"), "launch", "-c", str(work.recipe), "--hostfile",
                          str(hostfile), "--master-port", str(free_port()), f"train.run_dir={run}", "zero.stage=2",
                          "train.stop_at_step=8"], cwd=work.dir, env=local_cluster.env(), capture_output=True,
                         text=True, timeout=270)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "--launcher pdsh" in text and f"master {n1.addr}:" in text  # rank 0's address, asked over ssh
    assert f"{n1.name}: " in text and f"{n2.name}: " in text  # pdsh's per-host output prefixes
    env_file = (run / "launch" / ".deepspeed_env").read_text().splitlines()
    assert "GLOO_SOCKET_IFNAME=eth1" in env_file and "OMP_NUM_THREADS=1" in env_file
    ref = losses(reference[1])
    assert losses(run) == {s: ref[s] for s in range(1, 9)}

    # ZeRO-2: each rank updates its own partition of the fp32 weights; rank 0's full model (gathered from
    # both) must equal the partitions both ranks saved
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = run / "checkpoints"
    assert sorted(p.name for p in (ckpt / "step8").glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    partitions = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="step8")
    module = torch.load(ckpt / "step8" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert set(partitions) == set(module)
    assert [k for k in module if not torch.equal(module[k], partitions[k])] == []


@pytest.mark.timeout(420)
# Both with a DataLoader worker per rank, which the forwarded USR1 reaches too (it signals every process of
# the step) and which must survive it. dslauncher: srun starts the ranks with USR1's default action, so this
# holds only because the trainer installs its flag-only handler before the workers are forked.
@pytest.mark.parametrize("script, workers", [(PER_NODE, 1), (DSLAUNCHER, 1)], ids=["per-node", "dslauncher"])
def test_preempted_job_saves_requeues_and_resumes_exactly(local_cluster, work, reference, script, workers):
    """USR1 to the batch script (what `#SBATCH --signal=B:USR1@120` delivers before a time limit) ->
    forwarded to the ranks -> checkpoint -> exit 75 -> `scontrol requeue` -> the same job resumes and ends
    with the same losses as the uninterrupted one."""
    run = work.dir / f"preempt-{script.stem}"
    job_id = submit(local_cluster, work, script, f"train.run_dir={run}", f"data.num_workers={workers}")
    wait_for(lambda: len(records(run)) >= 3 or local_cluster.job(job_id).get("JobState") in TERMINAL_STATES, 180,
             "three steps")
    subprocess.run(["timeout", "30", "scancel", "--batch", "--signal=USR1", job_id], env=local_cluster.env(), check=True)

    def requeued(info: dict) -> bool:
        return int(info.get("Restarts", "0")) >= 1 and info.get("JobState") == "PENDING"

    info = local_cluster.wait_job(job_id, 120, until=lambda i: requeued(i) or i.get("JobState") in TERMINAL_STATES)
    assert requeued(info), f"{info}\n{job_log(work, job_id)[-4000:]}"
    # Slurm holds a requeued job back for about 2 minutes; let it start now, but not within the second its
    # old credential was revoked on the nodes ("Job credential revoked" fails the launch)
    time.sleep(3)
    local_cluster.scontrol("update", f"JobId={job_id}", "StartTime=now")
    job = finish(local_cluster, work, job_id)
    assert (job.info["JobState"], job.info["ExitCode"], job.info["Restarts"]) == ("COMPLETED", "0:0", "1"), job.log[-4000:]

    stopped = re.search(r"stop requested by signal at step (\d+)", job.log)
    assert stopped, job.log[-4000:]
    k = int(stopped.group(1))
    assert 3 <= k < STEPS
    for line in ("USR1", f"saved checkpoint {run}/checkpoints/step{k}", "requeueing job", "(restart 1)",
                 f"resumed from {run}/checkpoints/step{k}: step {k}", "finished"):
        assert line in job.log, line
    assert [r["step"] for r in records(run)] == list(range(1, STEPS + 1))  # each step once: no step redone
    assert losses(run) == losses(reference[1])


def _rank_pid(cluster: LocalCluster, node) -> int | None:
    for pid in cluster.node_pids(node):
        cmd = _cmdline(pid)
        if " pretrain " in cmd and "deepspeed" not in cmd:
            return pid
    return None


@pytest.mark.timeout(600)
@pytest.mark.parametrize("fault", ["rank-killed", "rank-stopped", "link-down"])
def test_lost_node_or_hung_rank_the_job_is_requeued_and_resumes_exactly(local_cluster, work, reference, fault):
    """A fault on node 2 mid-run; the job ends within a bounded time, is requeued and resumes exactly.
    link-down: node 2's network link goes down (the node vanishes: nothing it runs answers or closes a
      connection). srun finds the node gone and Slurm cancels the job for NODE FAILURE and requeues it itself
      (--requeue), before or just after the batch script sees the surviving rank's 69; the link comes back and
      the node returns to service (ReturnToService=2).
    rank-killed: node 2's rank is killed (SIGKILL; what the OOM killer or a crashed node does to it). Node 1's
      rank sees its peer go away, names rank 1 and exits 69; the batch script requeues on a rank's 69.
    rank-stopped: node 2's rank is stopped (SIGSTOP; the node stays up). Node 1's rank gets no answer within
      train.dist_timeout_s, names rank 1 and exits 69; srun ends the other task (the job's code is then its 143,
      the ranks' own codes say 69); the batch script requeues on a rank's 69.
    Either way the requeued job resumes from the last complete checkpoint and ends with the uninterrupted job's
    losses."""
    n2 = local_cluster.nodes[1]
    run = work.dir / f"fault-{fault}"
    job_id = submit(local_cluster, work, PER_NODE, f"train.run_dir={run}", "checkpoint.every=2",
                    "train.dist_timeout_s=15")
    wait_for(lambda: latest_complete(run) and len(records(run)) >= 5
             or local_cluster.job(job_id).get("JobState") in TERMINAL_STATES, 180, "a checkpoint and five steps")
    t0 = time.monotonic()
    if fault == "link-down":
        subprocess.run(["ip", "link", "set", n2.veth, "down"], check=True)
    else:
        pid = _rank_pid(local_cluster, n2)
        assert pid, f"no rank on node 2: {local_cluster.job(job_id)}"
        os.kill(pid, signal.SIGKILL if fault == "rank-killed" else signal.SIGSTOP)

    def requeued(info: dict) -> bool:
        return int(info.get("Restarts", "0")) >= 1 and info.get("JobState") == "PENDING"

    try:
        info = local_cluster.wait_job(job_id, 180,
                                      until=lambda i: requeued(i) or i.get("JobState") in TERMINAL_STATES)
    finally:
        if fault == "link-down":
            subprocess.run(["ip", "link", "set", n2.veth, "up"], check=True)
    ended_s = time.monotonic() - t0
    log = job_log(work, job_id)
    print(f"[{fault}] the job ended and was requeued {ended_s:.1f} s after the fault")
    assert requeued(info), f"{info}\n{log[-4000:]}"
    # Slurm lets a requeued job start about 2 minutes later, which may come before node 2 is back in service:
    # held until the test has seen the node back and nothing left of the first run on the nodes
    local_cluster.scontrol("hold", job_id)
    assert ended_s < 15 + 45, ended_s  # the collective's timeout plus Slurm's and the launchers' slack
    if fault == "link-down":
        # whichever comes first: Slurm cancelling the job for the node and requeueing it, or the batch script
        # (the surviving rank's 69) finding it requeued already
        assert "DUE TO NODE FAILURE" in log or "Slurm has already requeued job" in log, log[-4000:]
    else:
        assert "rank 1 stopped answering" in log and "requeueing job" in log and "(1 of 3)" in log, log[-4000:]
    # node 2 is back in service as soon as slurmctld hears from it: at once when a message of its own gets through
    # after the link comes back (its step's end), else at Slurm's next periodic registration request
    wait_for(lambda: "State=IDLE" in local_cluster.scontrol("show", "node", n2.name), REREGISTER_PERIOD_S + 40,
             "node 2 back in service",
             lambda: f"{local_cluster.scontrol('show', 'node', n2.name)}\n{local_cluster.job(job_id)}\n"
                     f"{local_cluster.logs()}")
    wait_for(lambda: not local_cluster.leftover_processes(), 30, "no job process left on the nodes")
    tag = latest_complete(run)
    time.sleep(3)  # not within the second the old credential was revoked (see the preemption test)
    local_cluster.scontrol("release", job_id)
    local_cluster.scontrol("update", f"JobId={job_id}", "StartTime=now")
    job = finish(local_cluster, work, job_id)
    assert (job.info["JobState"], job.info["ExitCode"]) == ("COMPLETED", "0:0"), job.log[-4000:]
    assert f"resumed from {run}/checkpoints/{tag}: step {int(tag.removeprefix('step'))}" in job.log, job.log[-4000:]
    assert losses(run) == losses(reference[1])


@pytest.mark.timeout(300)
def test_launch_with_the_openmpi_runner(local_cluster, work, reference):
    """`dupmae launch --launcher openmpi`, started on node 1 (mpirun reaches node 2 over ssh; the ranks
    find the master through mpi4py)."""
    n1, n2 = local_cluster.nodes
    hostfile = work.dir / "hosts-mpi"
    hostfile.write_text(f"{n1.name} slots=1\n{n2.name} slots=1\n")
    run = work.dir / "openmpi"
    cmd = local_cluster.in_node(n1, ["timeout", "240", str(BIN / "dupmae"), "launch", "-c", str(work.recipe),
                                     "--hostfile", str(hostfile), "--launcher", "openmpi", f"train.run_dir={run}",
                                     "train.stop_at_step=6"])
    out = subprocess.run(cmd, cwd=work.dir, env=local_cluster.env(), capture_output=True, text=True, timeout=270)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "--launcher openmpi" in out.stdout and "btl_tcp_if_include eth1" in out.stdout
    ref = losses(reference[1])
    assert losses(run) == {s: ref[s] for s in range(1, 7)}


@pytest.mark.timeout(120)
def test_unreachable_host_is_a_clear_error_within_seconds(local_cluster, work):
    n1, ghost = local_cluster.nodes[0], local_cluster.ghost
    hostfile = work.dir / "hosts-ghost"
    hostfile.write_text(f"{n1.name} slots=1\n{ghost.name} slots=1\n")
    t0 = time.monotonic()
    out = subprocess.run(["timeout", "60", str(BIN / "dupmae"), "launch", "-c", str(work.recipe), "--hostfile",
                          str(hostfile)], cwd=work.dir, env=local_cluster.env(), capture_output=True, text=True,
                         timeout=90)
    took = time.monotonic() - t0
    assert out.returncode == 2, out.stdout + out.stderr
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("dupmae launch: error: 1 of 2 host(s) not reachable over ssh")
    assert f"{ghost.name}: ssh: connect to host {ghost.addr} port 22" in message
    assert took < 45
    assert not local_cluster.leftover_processes()
