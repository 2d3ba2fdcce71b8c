"""The chaos soak (issue 14): a 2-rank CPU pre-training run (fp32, dropout on, the `deepspeed` launcher) is
preempted with SIGUSR1 at random times and has one rank SIGKILL-ed at a random time; after each stop it is
started again with the same command, as the sbatch scripts requeue a job (exit 75, or the job was killed).
The stitched run must end exactly where one uninterrupted run of the same steps ends.

What a soak asserts:
- every fault stops the job (a preemption with exit 75 after saving, a killed rank with a non-zero exit that
  ends every process of the job), and the requeued job goes on until the run is done;
- every restart resumed from the newest complete checkpoint on disk when the job ended (its files match the
  sizes and sha256 in its marker), or trained from step 1 where none existed yet; a preemption loses no step,
  a killed rank at most `checkpoint.every` steps; no checkpoint is ever found damaged, and no job saves a
  step twice (a preemption during a periodic save stops right after it);
- every row of RUN_DIR/metrics.jsonl, steps trained again after the SIGKILL included (the file is appended to,
  so those steps have several rows), equals the uninterrupted run's row of that step bit for bit (loss parts,
  lr, grad norm, consumed samples);
- every tensor of the final checkpoint (model, both ZeRO optimizer shards, each rank's torch RNG state) is
  `torch.equal` to the uninterrupted run's, and every other value in those files equal.

Faults, as Slurm delivers them: a preemption is SIGUSR1 either to every process of the job (what
`scancel --signal=USR1 JOBID` does to a job step; the launcher ignores it, as `trap "" USR1; exec deepspeed` in
cluster/slurm/pretrain.sbatch makes it) or to one rank only; the kill is SIGKILL of one rank. Each fault is
injected after the job has logged a drawn number of new steps, either a drawn delay after that step's line or
a drawn delay after the next checkpoint save has begun (its folder exists, its marker does not), so faults land
between steps and inside saves. The schedule is a function of the seed, printed with every result:
`DUPMAE_CHAOS_SEED=N` replays it (the process timing itself is not replayed: the same schedule lands at the
same steps, not at the same instruction).

The CI soak (`test_chaos_soak_short`): 30 steps, a checkpoint every 3, one preemption and one SIGKILL
inside a save: 127 s on the 2-core VM here (136 CPU-seconds, most of them the 4 starts of a 2-rank job; 3
minutes while another 2-rank job shared the cores). The full soak (`test_chaos_soak_full`, 300 steps, 8
preemptions and a SIGKILL, a fresh seed each time unless DUPMAE_CHAOS_SEED is set) runs only with
DUPMAE_CHAOS_SOAK=1. Each prints its figures: faults injected, runs that survived, steps lost per fault,
seconds from the fault to the end of the job (detect) and from the new start to its first new step (restart).
"""
from __future__ import annotations

import enum
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import pytest
import torch
from test_distributed import BIN, EXIT_PREEMPTED, free_port, rank_processes, read_metrics

from dupmae.engine import checkpoint

pytestmark = pytest.mark.distributed

SEED_ENV, FULL_ENV = "DUPMAE_CHAOS_SEED", "DUPMAE_CHAOS_SOAK"
KEYS = ("loss", "mlm", "dec", "bow", "lr", "grad_norm", "consumed_samples")


@dataclass(frozen=True)
class Soak:
    steps: int
    every: int  # checkpoint.every
    preemptions: int
    kill_in_save: bool | None = None  # None: drawn like the others


@dataclass(frozen=True)
class Fault:
    kind: str  # "usr1-job": every process of the job; "usr1-rank": one rank; "kill": SIGKILL of one rank
    rank: int  # the rank of "usr1-rank" and "kill"
    after: int  # new steps the job logs before the fault is armed
    in_save: bool  # armed: wait for the next save to begin (else: for nothing more)
    delay: float  # seconds after the step line or the start of the save (a save here takes about 50 ms)


def schedule(seed: int, soak: Soak) -> list[Fault]:
    """The faults, in order, as a function of `seed`. Each job gets at most one, after half to all of an equal
    share of the steps (so they spread over the run); the shares leave room for the steps a kill makes the
    run train again and for the fault-free job that finishes the run."""
    rng = random.Random(seed)
    kinds = [rng.choice(["usr1-job", "usr1-rank"]) for _ in range(soak.preemptions)]
    kinds.insert(rng.randrange(len(kinds) + 1), "kill")
    span = max(2, (soak.steps - 3 * soak.every) // len(kinds))
    faults = []
    for kind in kinds:
        in_save = rng.random() < 0.5
        if kind == "kill" and soak.kill_in_save is not None:
            in_save = soak.kill_in_save
        delay = rng.uniform(0.0, 0.03) if in_save else rng.uniform(0.0, 0.4)
        most = span - (soak.every if in_save else 0)  # a save within `every` steps of being armed
        faults.append(Fault(kind, rng.randrange(2), rng.randint(max(1, most // 2), most), in_save, round(delay, 3)))
    return faults


@dataclass
class Attempt:
    """One start of the job and what happened to it."""
    fault: Fault | None
    rc: int | None = None
    log: str = ""
    resumed_from: int | None = None  # the step of the checkpoint it resumed from (None: from scratch)
    first_row: int = 0  # index in metrics.jsonl of its first row
    rows: list[dict] = field(default_factory=list)
    t_start: float = 0.0
    t_first_step: float | None = None
    t_fault: float | None = None
    t_end: float = 0.0
    fault_step: int | None = None  # the last step logged when the fault was sent
    fault_hit_save: bool | None = None  # a save was under way (folder without marker) when it was sent
    complete_after: int | None = None  # the newest complete, verified checkpoint on disk when the job ended


def checkpoint_steps(ckpt: Path) -> tuple[list[int], list[int]]:
    """(complete steps, incomplete steps) of the checkpoint folders."""
    done, partial = [], []
    if ckpt.is_dir():
        for p in ckpt.iterdir():
            m = re.fullmatch(r"step(\d+)", p.name)
            if m and p.is_dir():
                (done if (p / checkpoint.MARKER).is_file() else partial).append(int(m.group(1)))
    return sorted(done), sorted(partial)


def saves_under_way(ckpt: Path, step: int, since: float) -> bool:
    """A checkpoint of `step` or later is being written: its folder was made after `since` (time.time(); less
    0.1 s, as file times lag the clock by a few ms), and its marker is not there yet (an incomplete folder left
    by an earlier job was made seconds before: a job takes longer than that to start)."""
    for s in checkpoint_steps(ckpt)[1]:
        try:
            if s >= step and (ckpt / f"step{s}").stat().st_ctime >= since - 0.1:
                return True
        except FileNotFoundError:  # removed meanwhile (a leftover, when the save of its step begins)
            pass
    return False


def verified(ckpt: Path, step: int) -> bool:
    """The checkpoint's files match the sizes and sha256 its marker recorded, and nothing else is there."""
    folder = ckpt / f"step{step}"
    marker = json.loads((folder / checkpoint.MARKER).read_text())
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != checkpoint.MARKER)
    if names != sorted(marker["files"]):
        return False
    return all(hashlib.sha256((folder / n).read_bytes()).hexdigest() == r["sha256"] for n, r in marker["files"].items())


class Chaos:
    def __init__(self, root: Path, tiny_recipe, soak: Soak, seed: int):
        self.root, self.soak, self.seed = root, soak, seed
        self.faults = schedule(seed, soak)
        sections = {"train": {"max_steps": soak.steps, "dist_timeout_s": 20},
                    "optim": {"schedule": "constant", "warmup": 6},
                    "checkpoint": {"every": soak.every, "keep_last": 2}}
        self.recipe = {name: tiny_recipe(root / f"{name}.toml", root / name, dropout=True, **sections)
                       for name in ("reference", "chaos")}
        self.attempts: list[Attempt] = []

    def replay(self) -> str:
        return (f"seed {self.seed} (replay: {SEED_ENV}={self.seed}), {self.soak}, faults "
                + json.dumps([asdict(f) for f in self.faults]))

    def start(self, name: str, n: int) -> tuple[subprocess.Popen, Path]:
        """The job as pretrain.sbatch starts it: the launcher ignores USR1 (`trap "" USR1; exec deepspeed`);
        its own session, so that nothing it starts outlives the test."""
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--no_local_rank", "--master_port", str(free_port()),
               str(BIN / "dupmae"), "pretrain", "--config", str(self.recipe[name])]
        log = self.root / f"{name}.{n}.log"
        with open(log, "w", encoding="utf-8") as out:
            proc = subprocess.Popen(["bash", "-c", 'trap "" USR1; exec "$@"', "bash", *cmd], stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        return proc, log

    def ranks(self, proc: subprocess.Popen) -> dict[int, psutil.Process]:
        return rank_processes(proc.pid)

    def fail(self, msg: str, log: Path | None = None) -> None:
        tail = log.read_text(encoding="utf-8")[-4000:] if log and log.is_file() else ""
        pytest.fail(f"{msg}\n{self.replay()}\n{tail}")

    def reference(self) -> float:
        proc, log = self.start("reference", 0)
        t0 = time.perf_counter()
        try:
            rc = proc.wait(timeout=60 + 2 * self.soak.steps)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            self.fail("the uninterrupted run did not finish", log)
        if rc != 0:
            self.fail(f"the uninterrupted run exited {rc}", log)
        return time.perf_counter() - t0

    def run_dir(self) -> Path:
        return self.root / "chaos"

    def chaos(self) -> None:
        """Start the job again and again (one fault each, while faults are left) until it exits 0."""
        run_dir, pending = self.run_dir(), list(self.faults)
        ckpt = run_dir / "checkpoints"
        while True:
            if len(self.attempts) > len(self.faults) + 2:
                self.fail("the job was started more often than faults were injected")
            attempt = Attempt(pending.pop(0) if pending else None, first_row=len(read_metrics(run_dir)))
            attempt.t_start = time.perf_counter()
            proc, log = self.start("chaos", len(self.attempts))
            members, t_members = set(), 0.0
            deadline = time.monotonic() + 120 + 3 * self.soak.steps
            fault, sent = attempt.fault, False
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    self.fail(f"job {len(self.attempts)} hung (fault {fault})", log)
                if time.perf_counter() - t_members > 0.25:
                    try:
                        members |= set(psutil.Process(proc.pid).children(recursive=True))
                    except psutil.Error:
                        pass
                    t_members = time.perf_counter()
                rows = read_metrics(run_dir)[attempt.first_row:]
                if rows and attempt.t_first_step is None:
                    attempt.t_first_step = time.perf_counter()
                if fault and not sent and len(rows) >= fault.after:
                    armed, last = time.time(), rows[-1]["step"]
                    if fault.in_save:  # the next save of this job: its folder appears before any of its files
                        while proc.poll() is None and not saves_under_way(ckpt, last, armed):
                            if time.monotonic() > deadline:
                                os.killpg(proc.pid, signal.SIGKILL)
                                self.fail(f"job {len(self.attempts)} saved no checkpoint (fault {fault})", log)
                            time.sleep(0.001)
                    time.sleep(fault.delay)
                    if proc.poll() is None:
                        attempt.fault_step = read_metrics(run_dir)[-1]["step"]
                        sent = self.inject(proc, fault)
                        attempt.t_fault = time.perf_counter()
                        attempt.fault_hit_save = saves_under_way(ckpt, attempt.fault_step, armed)
                time.sleep(0.01)
            attempt.rc, attempt.t_end = proc.returncode, time.perf_counter()
            # nothing of the job may outlive it (a rank left running would write into the next job's checkpoints)
            _, alive = psutil.wait_procs([p for p in members if p.is_running()], timeout=10)
            if alive:
                self.fail(f"job {len(self.attempts)} left {alive} running after it ended", log)
            attempt.log = log.read_text(encoding="utf-8")
            attempt.rows = read_metrics(run_dir)[attempt.first_row:]
            m = re.search(r"resumed from \S+/step(\d+): step (\d+)", attempt.log)
            attempt.resumed_from = int(m.group(1)) if m else None
            done, _ = checkpoint_steps(ckpt)
            good = [s for s in done if verified(ckpt, s)]
            attempt.complete_after = good[-1] if good else None
            self.attempts.append(attempt)
            if attempt.fault is not None and not sent:
                self.fail(f"job {len(self.attempts) - 1} ended (exit {attempt.rc}) before its fault was sent", log)
            if attempt.rc == 0:
                return
            # the requeue of the sbatch scripts: on 75, or when the job was killed; any other exit is a failure
            if not (attempt.rc == EXIT_PREEMPTED or (attempt.fault and attempt.fault.kind == "kill")):
                self.fail(f"job {len(self.attempts) - 1} exited {attempt.rc} after {attempt.fault}", log)

    def inject(self, proc: subprocess.Popen, f: Fault) -> bool:
        if f.kind == "usr1-job":
            os.killpg(proc.pid, signal.SIGUSR1)  # scancel --signal=USR1: every process of the step
            return True
        ranks = self.ranks(proc)
        if sorted(ranks) != [0, 1]:
            self.fail(f"ranks {sorted(ranks)} found when sending {f}")
        ranks[f.rank].send_signal(signal.SIGUSR1 if f.kind == "usr1-rank" else signal.SIGKILL)
        return True

    # -- what the soak asserts ------------------------------------------------------------------------------

    def check(self) -> dict:
        ref_dir, run_dir = self.root / "reference", self.run_dir()
        ref = {r["step"]: r for r in read_metrics(ref_dir) if "loss" in r}
        assert sorted(ref) == list(range(1, self.soak.steps + 1))
        figures = []
        for i, a in enumerate(self.attempts):
            where = f"job {i} ({a.fault}): {self.replay()}"
            assert "is damaged" not in a.log, where
            before = self.attempts[i - 1] if i else None
            if before is None or before.complete_after is None:
                assert a.resumed_from is None and "resumed from" not in a.log, where
                assert a.rows and a.rows[0]["step"] == 1, where
            else:
                # resumed from the newest complete checkpoint there was, and trained on from the step after it
                assert a.resumed_from == before.complete_after, where
                assert a.rows and a.rows[0]["step"] == a.resumed_from + 1, where
            saves = re.findall(r"saved checkpoint \S+/step(\d+)\n", a.log)
            assert len(saves) == len(set(saves)), (f"a step saved twice: {saves}", where)
            steps = [r["step"] for r in a.rows if "loss" in r]
            assert steps == list(range(steps[0], steps[0] + len(steps))), where
            if a.fault is None:
                assert a.rc == 0 and steps[-1] == self.soak.steps, where
                continue
            after = self.attempts[i + 1]
            lost = steps[-1] - (after.resumed_from or 0)
            if a.fault.kind == "kill":
                assert a.rc != 0 and a.rc != EXIT_PREEMPTED, where
                assert 0 <= lost <= self.soak.every, where
            else:
                assert a.rc == EXIT_PREEMPTED, where
                assert f"stop requested by signal at step {steps[-1]}: saving" in a.log, where
                assert lost == 0 and a.complete_after == steps[-1], where
            figures.append({"fault": a.fault.kind, "rank": a.fault.rank if a.fault.kind != "usr1-job" else "all",
                            "sent_after_step": a.fault_step, "during_save": a.fault_hit_save,
                            "exit": a.rc, "resumed_from": after.resumed_from, "steps_lost": lost,
                            "detect_s": round(a.t_end - a.t_fault, 2),
                            "restart_s": round(after.t_first_step - after.t_start, 2)})

        # every row of the stitched run, replayed steps included, equals the uninterrupted run's row
        rows = [r for r in read_metrics(run_dir) if "loss" in r]
        assert {r["step"] for r in rows} == set(ref), self.replay()
        for r in rows:
            assert {k: r[k] for k in KEYS} == {k: ref[r["step"]][k] for k in KEYS}, (r["step"], self.replay())
        replayed = len(rows) - len(ref)
        assert replayed == sum(f["steps_lost"] for f in figures), self.replay()

        # the final checkpoints: the same files, every tensor equal
        final = f"step{self.soak.steps}"
        ours, theirs = run_dir / "checkpoints" / final, ref_dir / "checkpoints" / final
        states = final_states(ours)
        assert len(states) == 5, sorted(states)  # model states, 2 ZeRO optimizer shards, 2 RNG files
        compared = assert_same_tensors(states, final_states(theirs), final)
        return {"seed": self.seed, "soak": asdict(self.soak), "faults_injected": len(figures),
                "survived": sum(1 for i, a in enumerate(self.attempts[1:], 1)
                                if a.resumed_from == self.attempts[i - 1].complete_after),
                "jobs": len(self.attempts), "rows_replayed": replayed, "tensors_compared": compared,
                "per_fault": figures}


def assert_same_tensors(a, b, where: str) -> int:
    """Every tensor in `a` is torch.equal to the one at the same place in `b`, and every other value equal (same
    keys, same structure, objects by their attributes); returns how many tensors were compared."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
        return 1
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)), where
        return sum(assert_same_tensors(a[k], b[k], f"{where}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        return sum(assert_same_tensors(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    if a is None or isinstance(a, (bool, int, float, str, enum.Enum)):
        assert a == b, (where, a, b)
        return 0
    assert type(a) is type(b) and hasattr(a, "__dict__"), (where, type(a), type(b))
    return assert_same_tensors(vars(a), vars(b), where)


def final_states(folder: Path) -> dict:
    """What a checkpoint folder holds, file by file; of each rank's RNG file the torch (and CUDA) state only:
    numpy's and Python's global generators are never seeded by the trainer and never drawn from in training,
    so two uninterrupted runs already differ there (each starts from the OS's entropy)."""
    states = {}
    for path in sorted(folder.glob("*.pt")):
        state = checkpoint.load_file(path)
        if path.name.startswith("rng_rank"):
            state = {k: v for k, v in state.items() if k in ("torch", "cuda")}
        states[path.name] = state
    return states


def soak_run(root: Path, tiny_recipe, soak: Soak, seed: int) -> dict:
    chaos = Chaos(root, tiny_recipe, soak, seed)
    print(f"\n[chaos soak] {chaos.replay()}")
    t0 = time.perf_counter()
    ref_s = chaos.reference()
    t1 = time.perf_counter()
    chaos.chaos()
    figures = chaos.check()
    figures.update(reference_s=round(ref_s, 1), chaos_s=round(time.perf_counter() - t1, 1),
                   total_s=round(time.perf_counter() - t0, 1))
    (root / "figures.json").write_text(json.dumps(figures, indent=2))
    print("[chaos soak] " + json.dumps(figures, indent=2))
    return figures


@pytest.mark.timeout(600)
def test_chaos_soak_short(tmp_path, tiny_recipe):
    """CI: 30 steps, a checkpoint every 3, one preemption and one SIGKILL of a rank inside a save."""
    seed = int(os.environ.get(SEED_ENV, "14"))
    figures = soak_run(tmp_path, tiny_recipe, Soak(steps=30, every=3, preemptions=1, kill_in_save=True), seed)
    assert figures["faults_injected"] == 2 == figures["survived"]


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(os.environ.get(FULL_ENV) != "1",
                    reason=f"the full chaos soak (300 steps, 9 faults, several minutes) runs with {FULL_ENV}=1")
def test_chaos_soak_full(tmp_path, tiny_recipe):
    """300 steps, a checkpoint every 5, 8 preemptions and one SIGKILL, at times drawn from a fresh seed."""
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(10**6))
    figures = soak_run(tmp_path, tiny_recipe, Soak(steps=300, every=5, preemptions=8), seed)
    assert figures["faults_injected"] == 9 == figures["survived"]
