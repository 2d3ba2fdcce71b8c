"""Real runs through the real launchers (`deepspeed`, `torchrun`, or none), 2 gloo ranks on this machine:
the same updates whatever the ZeRO stage and the split of the global batch, bit-exact resume, SIGTERM,
a rank killed mid-run, a rank that hangs (SIGSTOP), a disk that fills during a save, and what a run leaves in its
run directory.

Runs are compared through RUN_DIR/metrics.jsonl. Every run uses the tiny 2-layer, 32-wide BERT of
`tiny_recipe` on `tiny_shards`, fp32, 4 samples per rank and micro step (8 in one process). Runs that
several tests compare against are made once per module (`lab.once`)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from test_checkpoint_faults import small_disk  # noqa: F401  (a fixture)

from dupmae.engine.config import load_config

pytestmark = pytest.mark.distributed

BIN = Path(sys.executable).parent
EXIT_PREEMPTED = 75
EXIT_RANK_LOST = 69

# float32 on both sides: 2 ranks all-reduce gradient halves and sum the loss parts in another order than
# one process over the whole global batch; the difference measured is about 1e-7 relative per step (the
# float32 rounding floor) and stays there over these few steps. 1e-5 leaves room for that noise, while a
# wrong normalization (a factor 2 on the gradient, a lost micro batch) moves the losses by far more.
REL = 1e-5

# exact comparisons: no dropout (1 process and 2 ranks draw different dropout masks)
EXACT = {"dropout": False, "train": {"max_steps": 6}}
# the resume / SIGTERM / dead-rank runs: dropout ON, so restoring each rank's RNG is part of what they prove;
# a warmup counted in steps and a constant schedule, so stopping at max_steps=k and continuing to N follows
# the same learning rates as one run to N (a linear/cosine schedule is a function of max_steps); the warmup
# outlasts the first stop, so the resumed run must also pick the schedule up mid-warmup.
N, K = 16, 5
RESUMABLE = {"dropout": True, "train": {"max_steps": N}, "optim": {"schedule": "constant", "warmup": 6},
             "checkpoint": {"every": 4, "keep_last": 2}}


def resumable(**more) -> dict:
    """The sections of RESUMABLE, updated by `more` (section -> keys)."""
    sections = {k: dict(v) for k, v in RESUMABLE.items() if k != "dropout"}
    for k, v in more.items():
        sections.setdefault(k, {}).update(v)
    return sections


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(launcher: str, recipe: Path, overrides=()) -> list[str]:
    args = ["pretrain", "--config", str(recipe), *overrides]
    if launcher == "single":
        return [str(BIN / "dupmae"), *args]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", "2", "--no_local_rank", "--master_port", str(free_port()),
                str(BIN / "dupmae"), *args]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                "-m", "dupmae.engine.cli", *args]
    raise ValueError(launcher)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def steps(run_dir: Path) -> dict[int, dict]:
    """Training lines by step; a step trained again after a resume keeps its last line."""
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


@dataclass
class Run:
    rc: int
    log: str
    run_dir: Path
    seconds: float

    @property
    def steps(self) -> dict[int, dict]:
        return steps(self.run_dir)


def rank_processes(pid: int) -> dict[int, psutil.Process]:
    """{rank: process} for the descendants of process `pid` that a launcher gave a RANK and a LOCAL_RANK."""
    found = {}
    for p in psutil.Process(pid).children(recursive=True):
        try:
            env = p.environ()
        except psutil.Error:
            continue
        if "RANK" in env and "LOCAL_RANK" in env:
            found[int(env["RANK"])] = p
    return found


def assert_resumes_identically(launcher: str, recipe: Path, run_dir: Path, ref) -> None:
    """The newest complete checkpoint is a step4k one; the same command resumes from it and reproduces the
    uninterrupted run `ref` from the next step on."""
    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest_complete").read_text().strip()
    last = int(tag[4:])
    assert last >= 4 and last % 4 == 0 and (ckpt / tag / "dupmae_complete.json").is_file()
    again = Job(launcher, recipe, run_dir, name="rerun").wait()
    assert again.rc == 0, again.log[-4000:]
    assert f"resumed from {ckpt / tag}: step {last}" in again.log
    assert_identical(again.steps, ref.steps, from_step=last + 1)


class Job:
    """A launched run: the launcher is the leader of a new session, so nothing it starts outlives a test."""

    def __init__(self, launcher: str, recipe: Path, run_dir: Path, overrides=(), name: str = "run"):
        self.run_dir, self.recipe = Path(run_dir), recipe
        self.log_path = self.run_dir.parent / f"{self.run_dir.name}.{name}.log"
        self.log_file = open(self.log_path, "w", encoding="utf-8")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(command(launcher, recipe, overrides), stdout=self.log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})

    def ranks(self) -> list[psutil.Process]:
        """The rank processes (the launcher's descendants that were given a RANK), by rank."""
        found = rank_processes(self.proc.pid)
        return [found[r] for r in sorted(found)]

    def wait_for_step(self, step: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(steps(self.run_dir)) < step:
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (exit {self.proc.returncode}) before step {step}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no step {step} after {timeout} s:\n{self.tail()}")
            time.sleep(0.02)

    def wait(self, timeout: float = 240) -> Run:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.log_path.name}: still running after {timeout} s:\n{self.tail()}")
        finally:
            self.log_file.close()
        return Run(rc, self.log_path.read_text(encoding="utf-8"), self.run_dir, time.perf_counter() - self.t0)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def tail(self, n: int = 4000) -> str:
        self.log_file.flush()
        return self.log_path.read_text(encoding="utf-8")[-n:]


class Lab:
    def __init__(self, root: Path, tiny_recipe):
        self.root, self.tiny_recipe, self.cache = root, tiny_recipe, {}

    def recipe(self, name: str, dropout: bool, **sections) -> tuple[Path, Path]:
        run_dir = self.root / name
        return self.tiny_recipe(self.root / f"{name}.toml", run_dir, dropout=dropout, **sections), run_dir

    def run(self, name: str, launcher: str, settings: dict, overrides=(), timeout: float = 240, **more) -> Run:
        """A fresh run to completion; `more` updates sections of `settings`."""
        sections = {k: dict(v) for k, v in settings.items() if k != "dropout"}
        for k, v in more.items():
            sections.setdefault(k, {}).update(v)
        recipe, run_dir = self.recipe(name, settings["dropout"], **sections)
        return Job(launcher, recipe, run_dir, overrides).wait(timeout)

    def once(self, name: str, launcher: str, settings: dict, **more) -> Run:
        if name not in self.cache:
            run = self.run(name, launcher, settings, **more)
            assert run.rc == 0, run.log[-4000:]
            self.cache[name] = run
        return self.cache[name]

    # the runs several tests compare with
    def single_micro8(self) -> Run:
        return self.once("single-micro8", "single", EXACT, data={"micro_batch": 8})

    def ranks2(self, stage: int, launcher: str) -> Run:
        return self.once(f"ranks2-zero{stage}", launcher, EXACT, zero={"stage": stage})

    def reference(self, stage: int, launcher: str) -> Run:
        """2 ranks, dropout on, N steps without interruption."""
        return self.once(f"reference-zero{stage}", launcher, RESUMABLE, zero={"stage": stage})


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_recipe) -> Lab:
    return Lab(tmp_path_factory.mktemp("runs"), tiny_recipe)


def assert_same_training(ours: dict[int, dict], ref: dict[int, dict], rel: float = REL, grad_norm: bool = True):
    assert sorted(ours) == sorted(ref) == list(range(1, len(ref) + 1))
    for s in ref:
        a, b = ours[s], ref[s]
        for key in ("loss", "mlm", "dec", "bow"):
            assert a[key] == pytest.approx(b[key], rel=rel), (s, key, a[key], b[key])
        assert a["lr"] == b["lr"] and a["consumed_samples"] == b["consumed_samples"]
        if grad_norm:
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=10 * rel), (s, a["grad_norm"], b["grad_norm"])


def assert_identical(ours: dict[int, dict], ref: dict[int, dict], from_step: int):
    """Bit-identical losses, parts, lr and grad norm from `from_step` on."""
    assert sorted(s for s in ours if s >= from_step) == [s for s in sorted(ref) if s >= from_step]
    keys = ("loss", "mlm", "dec", "bow", "lr", "grad_norm", "consumed_samples")
    for s in range(from_step, max(ref) + 1):
        assert {k: ours[s][k] for k in keys} == {k: ref[s][k] for k in keys}, s


# -- the same update whatever the split of the global batch ----------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage, launcher", [(0, "deepspeed"), (1, "torchrun"), (2, "deepspeed"), (3, "torchrun")])
def test_zero_stages_match_one_process(lab, stage, launcher):
    """2 ranks x micro batch 4 under ZeRO-0/1/2/3 = 1 process x micro batch 8, step by step."""
    single = lab.single_micro8()
    ranks = lab.ranks2(stage, launcher)
    assert "2 rank(s), global batch 8 (4 x 1 x 2)" in ranks.log and f"ZeRO-{stage}" in ranks.log
    assert "1 rank(s), global batch 8 (8 x 1 x 1)" in single.log
    # ZeRO-0 logs no grad norm (test_trainer.py::test_zero0_logs_grad_norm, xfail): compare it from ZeRO-1 on
    assert_same_training(ranks.steps, single.steps, grad_norm=stage != 0)
    assert len(single.steps) == 6


@pytest.mark.timeout(240)
def test_gradient_accumulation(lab):
    """1 process x micro 4 x 2 accumulation steps = 1 process x micro 8 = 2 ranks x micro 4."""
    accum = lab.once("single-micro4-accum2", "single", EXACT, data={"micro_batch": 4, "grad_accum": 2})
    assert "1 rank(s), global batch 8 (4 x 2 x 1)" in accum.log
    assert_same_training(accum.steps, lab.single_micro8().steps)
    assert_same_training(accum.steps, lab.ranks2(2, "deepspeed").steps)


# -- resume ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage, launcher", [(2, "deepspeed"), (3, "torchrun")])
def test_resume_is_bit_exact(lab, stage, launcher):
    """max_steps=K, then the same command with max_steps=N in the same run dir: steps K+1..N are
    bit-identical to one uninterrupted run of N steps (fp32 on CPU is deterministic; dropout on)."""
    ref = lab.reference(stage, launcher)
    recipe, run_dir = lab.recipe(f"resumed-zero{stage}", True, **resumable(zero={"stage": stage}))
    first = Job(launcher, recipe, run_dir, [f"train.max_steps={K}"], name="first").wait()
    assert first.rc == 0, first.log[-4000:]
    assert sorted(first.steps) == list(range(1, K + 1))
    assert_identical(first.steps, {s: r for s, r in ref.steps.items() if s <= K}, from_step=1)  # same schedule
    second = Job(launcher, recipe, run_dir, [f"train.max_steps={N}"], name="second").wait()
    assert second.rc == 0, second.log[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step{K}'}: step {K}" in second.log
    assert_identical(second.steps, ref.steps, from_step=K + 1)


# -- preemption and failures -----------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_sigterm_saves_exits_75_and_resumes(lab):
    """SIGTERM to both ranks (what a scheduler sends before preempting): they agree at the next step
    boundary, save a complete checkpoint and exit 75; the deepspeed launcher exits with the ranks' 75.
    The same command then resumes and ends exactly where an uninterrupted run ends."""
    ref = lab.reference(2, "deepspeed")
    recipe, run_dir = lab.recipe("sigterm", True, **resumable())
    job = Job("deepspeed", recipe, run_dir, name="interrupted")
    job.wait_for_step(2)
    ranks = job.ranks()
    assert len(ranks) == 2
    for p in ranks:
        p.send_signal(signal.SIGTERM)
    stopped = job.wait(timeout=120)
    # the launcher's own status: deepspeed's launch.py exits with the first non-zero rank status it sees
    assert stopped.rc == EXIT_PREEMPTED, stopped.log[-4000:]
    assert "exits with return code = 75" in stopped.log
    at = max(stopped.steps)
    assert 2 <= at < N
    assert f"stop requested by signal at step {at}: saving" in stopped.log
    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest_complete").read_text().strip()
    assert tag == f"step{at}"
    marker = json.loads((ckpt / tag / "dupmae_complete.json").read_text())
    assert marker["step"] == at and marker["world_size"] == 2 and marker["consumed_samples"] == 8 * at
    assert {p.name for p in (ckpt / tag).glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    assert_identical(stopped.steps, {s: r for s, r in ref.steps.items() if s <= at}, from_step=1)

    again = Job("deepspeed", recipe, run_dir, name="resumed").wait()
    assert again.rc == 0, again.log[-4000:]
    assert f"resumed from {ckpt / tag}: step {at}" in again.log
    assert again.steps[N]["loss"] == ref.steps[N]["loss"]
    assert_identical(again.steps, ref.steps, from_step=at + 1)


@pytest.mark.timeout(240)
def test_no_allreduce_buffer_is_left_in_dev_shm(lab):
    """DeepSpeed's CPU allreduce (ranks on one machine, the deepspeed launcher) creates a 67 MB /dev/shm file per
    rank and never removes it. The ranks unlink theirs as soon as every rank has mapped them all: gone while the
    job runs, so a killed job leaves nothing either."""
    recipe, run_dir = lab.recipe("shm", False, **resumable())
    job = Job("deepspeed", recipe, run_dir, name="shm")
    job.wait_for_step(2)
    env = job.ranks()[0].environ()
    assert env.get("LOCAL_SIZE") == "2"  # the condition under which DeepSpeed uses the shared-memory allreduce
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_*"
    assert not sorted(Path("/dev/shm").glob(pattern))
    job.kill()
    assert not sorted(Path("/dev/shm").glob(pattern))


@pytest.mark.timeout(300)
def test_dead_rank_ends_the_job_and_the_checkpoint_survives(lab):
    """kill -9 of rank 0 mid-run under torchrun: the job ends, non-zero, within a bounded time, leaves no
    process behind, and the same command resumes from the last complete checkpoint to the same end."""
    ref = lab.reference(2, "deepspeed")
    recipe, run_dir = lab.recipe("dead-rank", True, **resumable(train={"dist_timeout_s": 20}))
    job = Job("torchrun", recipe, run_dir, name="killed")
    job.wait_for_step(6)  # the step-4 checkpoint is complete before step 5 starts
    everyone = psutil.Process(job.proc.pid).children(recursive=True)
    ranks = job.ranks()
    assert len(ranks) == 2
    ranks[0].kill()
    t_kill = time.perf_counter()
    dead = job.wait(timeout=150)
    assert dead.rc != 0
    assert time.perf_counter() - t_kill < 90, "the job outlived its dead rank by more than 90 s"
    gone, alive = psutil.wait_procs(everyone, timeout=5)
    assert not alive, f"left running: {alive}"
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(recipe) in " ".join(p.info["cmdline"] or [])]
    assert max(dead.steps) < N

    assert_resumes_identically("torchrun", recipe, run_dir, ref)


def test_every_group_a_run_makes_times_out_after_dist_timeout_s(monkeypatch):
    """torch gives a group made without a timeout 30 minutes, not the world group's; DeepSpeed reduces gradients
    and gathers ZeRO partitions on such a group (its clone of the world group), so a hung rank kept the others
    waiting 30 minutes whatever train.dist_timeout_s said. `distributed.init` gives every group the run's."""
    import datetime as dt

    import deepspeed.utils.groups
    import torch
    import torch.distributed as torch_dist
    from test_trainer import one_rank_env
    from torch.distributed import distributed_c10d

    from dupmae.engine import distributed

    if torch_dist.is_initialized():
        pytest.skip("a process group of another test is still open in this process")
    one_rank_env(monkeypatch)
    monkeypatch.setattr(deepspeed.utils.groups, "_WORLD_GROUP", None)
    monkeypatch.setattr(distributed_c10d, "default_pg_timeout", distributed_c10d.default_pg_timeout)
    monkeypatch.setattr(distributed_c10d, "default_pg_nccl_timeout", distributed_c10d.default_pg_nccl_timeout)

    def timeout(group) -> dt.timedelta:
        return group._get_backend(torch.device("cpu")).options._timeout

    distributed.init(17)
    try:
        clone = deepspeed.utils.groups._clone_world_group()  # what ZeRO's data-parallel group is
        assert timeout(torch_dist.group.WORLD) == timeout(clone) == timeout(torch_dist.new_group(ranks=[0])) \
            == dt.timedelta(seconds=17)
    finally:
        distributed.shutdown()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("stopped", [1, 0])
def test_hung_rank_ends_the_job_within_the_timeout_and_the_checkpoint_survives(lab, stopped):
    """SIGSTOP of one rank in the middle of a step (sent 0.4 step into it: most often during forward/backward, so
    the other waits in ZeRO's gradient all-reduce) under the deepspeed launcher, train.dist_timeout_s = 15. A
    stopped process keeps its sockets open and answers nothing: only a timeout ends the wait. The other rank exits
    69 within 15 s + 30 s of slack (8-11 s of it measured alone, 21 s once under load; up to 7 s of it asking the
    job's store who still answers: rank 0's process holds that store, so with rank 0 stopped the asking is given
    up) naming the stopped rank and the step; the stopped rank is killed (what the launcher does 30 s later) and
    the launcher exits 69; nothing is left running; the same command resumes from the last complete checkpoint
    and ends as the uninterrupted run."""
    ref = lab.reference(2, "deepspeed")
    limit = 15
    recipe, run_dir = lab.recipe(f"hung-rank{stopped}", True, **resumable(train={"dist_timeout_s": limit}))
    job = Job("deepspeed", recipe, run_dir, name="hung")
    try:
        job.wait_for_step(6)  # the step-4 checkpoint is complete
        time.sleep(0.4 * steps(run_dir)[6]["step_s"])
        everyone = psutil.Process(job.proc.pid).children(recursive=True)
        ranks = job.ranks()
        ranks[stopped].suspend()  # SIGSTOP
        t_stop = time.perf_counter()
        ranks[1 - stopped].wait(timeout=limit + 60)
        detect = time.perf_counter() - t_stop
        # the launcher would now send the stopped rank SIGTERM, which it cannot act on, and SIGKILL 30 s later
        # (DeepSpeed's wait, measured: the launcher exits 54-58 s after the stop); do its SIGKILL now, not to
        # spend those 30 s of CI (the two-node Slurm test, tests/test_cluster.py, leaves the clean-up to srun)
        time.sleep(1)
        ranks[stopped].kill()
        hung = job.wait(timeout=120)
        total = time.perf_counter() - t_stop
        # what the launcher left: looked at before the clean-up below, which would hide it
        gone, alive = psutil.wait_procs(everyone, timeout=5)
        left = [p for p in psutil.process_iter(["cmdline"]) if str(recipe) in " ".join(p.info["cmdline"] or [])]
    finally:
        job.kill()  # after a failure above: the whole session, the stopped rank included (SIGKILL needs no SIGCONT)
    print(f"hung rank: rank {1 - stopped} exited {detect:.1f} s after rank {stopped} stopped, the launcher "
          f"{total:.1f} s after")
    assert hung.rc == EXIT_RANK_LOST, hung.log[-4000:]
    assert "exits with return code = 69" in hung.log
    # 22-26 s measured alone on 2 cores; 36 s once while another 2-rank job shared them
    assert detect < limit + 30, f"the other rank ended {detect:.1f} s after the stop (dist_timeout_s {limit})"
    at = max(hung.steps)
    assert at < N
    named = f"dupmae pretrain: error: rank {1 - stopped}: rank {stopped} "
    lines = [line for line in hung.log.splitlines() if line.startswith(named) and "stopped answering" in line]
    assert len(lines) == 1, hung.log[-4000:]
    assert f"no answer within train.dist_timeout_s = {limit} s" in lines[0]
    assert f"step {at} " in lines[0] or f"step {at + 1} " in lines[0], lines[0]
    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest_complete").read_text().strip()
    assert f"the last complete checkpoint is {ckpt / tag}, from which it resumes" in lines[0]
    assert not alive and not left, f"left running: {alive} {left}"

    assert_resumes_identically("deepspeed", recipe, run_dir, ref)


@pytest.mark.timeout(300)
def test_disk_full_during_a_save_ends_every_rank_74(lab, small_disk):
    """The run directory on a 24 MB tmpfs (one checkpoint of this run is 16.6 MB), keep_last 1: step 8's save
    fills the disk on whichever rank writes last. No rank waits for the other: both print the disk-full
    message and exit 74, and so does the deepspeed launcher; step 4 stays the resume point. After the disk
    grows, the same command resumes from step 4 and ends bit-identical to the uninterrupted run."""
    ref = lab.reference(2, "deepspeed")
    disk = small_disk("24m")
    run_dir = disk.path / "run"
    recipe = lab.tiny_recipe(lab.root / "disk-full.toml", run_dir, dropout=True,
                             **resumable(checkpoint={"keep_last": 1}, train={"dist_timeout_s": 120}))
    full = Job("deepspeed", recipe, run_dir, name="full").wait()
    assert full.rc == 74, full.log[-4000:]
    assert "exits with return code = 74" in full.log
    ckpt = run_dir / "checkpoints"
    lines = [line for line in full.log.splitlines() if "dupmae pretrain: error: disk full" in line]
    assert len(lines) == 2, full.log[-4000:]  # one per rank: neither was left waiting in a collective
    assert all(f"checkpoint {ckpt / 'step8'} could not be written: rank " in line and
               "[Errno 28] No space left on device" in line and
               f"{ckpt / 'latest_complete'} still names step4" in line for line in lines), lines
    assert "Timed out" not in full.log and "Traceback" not in full.log
    assert max(full.steps) == 8
    assert (ckpt / "latest_complete").read_text() == "step4"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step4"]

    disk.resize("64m")
    again = Job("deepspeed", recipe, run_dir, name="resumed").wait()
    assert again.rc == 0, again.log[-4000:]
    assert f"resumed from {ckpt / 'step4'}: step 4" in again.log
    assert_identical(again.steps, ref.steps, from_step=5)


# -- what a run leaves behind ----------------------------------------------------------------------------

TB_TAGS = {"loss/total", "loss/mlm", "loss/dec", "loss/bow", "lr", "grad_norm", "throughput/tokens_per_s",
           "throughput/mfu", "time/step_s", "time/data_wait_share", "memory/peak"}


@pytest.mark.timeout(240)
def test_run_dir_tensorboard_config_and_retention(lab):
    ref = lab.reference(2, "deepspeed")
    run_dir = ref.run_dir
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert TB_TAGS <= tags, TB_TAGS - tags
    losses = acc.Scalars("loss/total")
    assert [e.step for e in losses] == list(range(1, N + 1))  # logging.every = 1; x-axis: the optimizer step
    assert [e.value for e in losses] == pytest.approx([ref.steps[s]["loss"] for s in range(1, N + 1)], rel=1e-6)
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([ref.steps[s]["lr"] for s in range(1, N + 1)])

    # the resolved configuration and the generated DeepSpeed JSON, next to the outputs
    recipe = run_dir.parent / f"{run_dir.name}.toml"
    assert load_config(run_dir / "config.toml") == load_config(recipe)
    ds = json.loads((run_dir / "deepspeed.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0

    # checkpoint.every 4, keep_last 2: steps 4 and 8 were removed when 12 and 16 were complete
    ckpt = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step12", "step16"]
    assert (ckpt / "latest_complete").read_text().strip() == "step16"
    assert all((ckpt / t / "dupmae_complete.json").is_file() for t in ("step12", "step16"))


@pytest.mark.timeout(240)
def test_a_training_process_exits_with_its_code_whatever_teardown_does(tmp_path, tiny_recipe):
    """The exit code of `dupmae pretrain` is what the batch scripts requeue on (75, 69, ...): once the run is
    saved, the process ends without the interpreter's teardown, where C++ objects of torch, gloo and DeepSpeed
    are destroyed in no fixed order and can abort (on CI: a USR1-stopped rank exited -6, its job 250, after a
    complete save). Stand-in for such an abort: an exit handler that aborts. A training command never runs it;
    any other program does."""
    aborting = "import atexit, os, sys; atexit.register(os.abort); "
    plain = subprocess.run([sys.executable, "-c", aborting + "sys.exit(0)"], timeout=60)
    assert plain.returncode == -signal.SIGABRT

    recipe = tiny_recipe(tmp_path / "r.toml", tmp_path / "run", train={"max_steps": 2})
    code = (aborting + f"sys.argv = ['dupmae', 'pretrain', '--config', {str(recipe)!r}]; "
            "from dupmae.engine.cli import main; sys.exit(main())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=200,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "done: 2 steps" in out.stdout + out.stderr  # what the process printed last was flushed
    assert (tmp_path / "run" / "checkpoints" / "step2" / "dupmae_complete.json").is_file()
