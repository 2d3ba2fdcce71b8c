"""`dupmae launch` without a cluster: the deepspeed commands it builds for every mode, the variables every
node gets, the files it writes, its errors, the Slurm batch scripts it generates, and the example
hostfiles and DeepSpeed configs (batch-size arithmetic through the trainer's own merge)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dupmae.cluster import launch
from dupmae.cluster.launch import LaunchError, plan_launch
from dupmae.cluster.slurm import BatchSettings, SbatchError, render, template_path
from dupmae.engine.cli import build_parser
from dupmae.engine.config import ConfigError, load_config
from dupmae.engine.trainer import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "cluster" / "examples"
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def no_user_files(tmp_path, monkeypatch):
    """No ~/.deepspeed_env or ./.deepspeed_env of the machine running the tests."""
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def recipe(tmp_path, tiny_recipe):
    return tiny_recipe(tmp_path / "tiny.toml", tmp_path / "run", train={"max_steps": 4})


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# two nodes\nnode-a slots=2\nnode-b slots=2\n")
    return path


def plan(recipe, *argv, environ=None, probe=False):
    args = build_parser().parse_args(["launch", "-c", str(recipe), *argv])
    return plan_launch(args, load_config(args.config, args.overrides), probe=probe,
                       environ={} if environ is None else environ)


def after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_this_machine(recipe, tmp_path):
    p = plan(recipe, "--gpus-per-node", "2")
    assert p.command == [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29500", "--no_local_rank",
                         str(BIN / "dupmae"), "pretrain", "--config", str(tmp_path / "run" / "launch" / "config.toml")]
    assert p.runner == "local" and p.world_size == 2


def test_pdsh_over_a_hostfile(recipe, hostfile, tmp_path):
    p = plan(recipe, "--hostfile", str(hostfile), "--master-addr", "10.0.0.1", "--master-port", "29777",
             environ={"GLOO_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5_0,mlx5_1", "OMP_NUM_THREADS": "4",
                      "HOME_IS_NOT_FORWARDED": "x", "PATH": "/opt/venv/bin:/usr/bin"})
    cmd = p.command
    assert cmd[:2] == [str(BIN / "deepspeed"), "--hostfile"]
    assert after(cmd, "--hostfile") == str(tmp_path / "run" / "launch" / "hostfile")
    assert after(cmd, "--launcher") == "pdsh" and "--no_ssh_check" in cmd and "--force_multi" not in cmd
    assert (after(cmd, "--master_addr"), after(cmd, "--master_port")) == ("10.0.0.1", "29777")
    assert cmd[-5:] == ["--no_local_rank", str(BIN / "dupmae"), "pretrain", "--config",
                        str(tmp_path / "run" / "launch" / "config.toml")]
    assert p.hostfile_text == "node-a slots=2\nnode-b slots=2\n" and p.world_size == 4
    assert p.variables == {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5_0,mlx5_1", "OMP_NUM_THREADS": "4",
                           "PATH": "/opt/venv/bin:/usr/bin"}


def test_one_remote_host_is_forced_through_pdsh(recipe, tmp_path):
    (tmp_path / "one").write_text("gpu-node-7 slots=8\n")
    p = plan(recipe, "--hostfile", str(tmp_path / "one"), "--master-addr", "10.0.0.7", "data.micro_batch=1")
    assert "--force_multi" in p.command  # or DeepSpeed would run the 8 ranks on this machine


def test_nodes_gpus_and_slot_filters(recipe, tmp_path):
    hosts = EXAMPLES / "hostfile-4x8"
    p = plan(recipe, "--hostfile", str(hosts), "--nodes", "2", "--gpus-per-node", "4", "--master-addr", "x1")
    assert p.hostfile_text == "node001 slots=4\nnode002 slots=4\n" and p.world_size == 8
    p = plan(recipe, "--hostfile", str(hosts), "--exclude", "node003@node004", "--master-addr", "x1")
    assert p.hostfile_text == "node001 slots=8\nnode002 slots=8\n"
    # particular GPU ids: DeepSpeed's own filter on the user's hostfile says which
    p = plan(recipe, "--hostfile", str(hosts), "--include", "node002:1,3", "--master-addr", "x1")
    assert after(p.command, "--hostfile") == str(hosts) and after(p.command, "--include") == "node002:1,3"
    assert p.hostfile_text is None and p.world_size == 2


def test_per_node_mode(recipe, hostfile):
    p = plan(recipe, "--hostfile", str(hostfile), "--no-ssh", "--node-rank", "1", "--master-addr", "10.0.0.1")
    assert p.runner == "no-ssh"
    assert p.command[p.command.index("--no_ssh"):p.command.index("--no_ssh") + 3] == ["--no_ssh", "--node_rank", "1"]
    assert "--launcher" not in p.command
    with pytest.raises(LaunchError, match="--node-rank must be 0..1"):
        plan(recipe, "--hostfile", str(hostfile), "--no-ssh", "--node-rank", "2", "--master-addr", "10.0.0.1")
    with pytest.raises(LaunchError, match="give --master-addr"):
        plan(recipe, "--hostfile", str(hostfile), "--no-ssh", "--node-rank", "0")


def test_openmpi_runner_uses_the_ranks_interface(recipe, hostfile):
    p = plan(recipe, "--hostfile", str(hostfile), "--launcher", "openmpi", "--master-addr", "10.0.0.1",
             environ={"GLOO_SOCKET_IFNAME": "eth1"})
    assert after(p.command, "--launcher") == "openmpi"
    assert after(p.command, "--launcher_args") == "--mca btl_tcp_if_include eth1 --mca oob_tcp_if_include eth1"
    p = plan(recipe, "--hostfile", str(hostfile), "--launcher", "openmpi", "--master-addr", "10.0.0.1",
             "--launcher-args", "--mca btl_tcp_if_include ib0", environ={"GLOO_SOCKET_IFNAME": "eth1"})
    assert after(p.command, "--launcher_args") == "--mca btl_tcp_if_include ib0"


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, body in {
        "scontrol": 'if [ "$1 $2" = "show hostnames" ]; then printf "gpu1\\ngpu2\\n"; exit 0; fi\n'
                    'echo "NodeName=$3 NodeAddr=10.9.0.${3#gpu} NodeHostName=$3"\n',
        "sinfo": "exit 0\n",
    }.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_inside_a_slurm_allocation(recipe, fake_scontrol):
    env = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_GPUS_ON_NODE": "2"}
    p = plan(recipe, "--slurm", environ=env)
    assert p.hostfile_text == "gpu1 slots=2\ngpu2 slots=2\n"
    assert (after(p.command, "--master_addr"), after(p.command, "--master_port")) == ("10.9.0.1", "29734")
    assert after(p.command, "--launcher") == "pdsh"
    p = plan(recipe, "--slurm", "--launcher", "slurm", environ=env)
    assert after(p.command, "--launcher_args") == "--kill-on-bad-exit=1 --ntasks-per-node=2"
    assert p.variables["MASTER_ADDR"] == "10.9.0.1" and p.variables["MASTER_PORT"] == "29734"
    p = plan(recipe, "--slurm", "--no-ssh", environ=env | {"SLURM_NODEID": "1"})
    assert after(p.command, "--node_rank") == "1"


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "2"], "need --hostfile or --slurm"),
    (["--launcher", "slurm", "--hostfile", "{hosts}", "--master-addr", "x"], "inside an allocation"),
    (["--slurm"], "SLURM_JOB_NODELIST is not set"),
    (["--no-ssh", "--launcher", "openmpi", "--hostfile", "{hosts}"], "it takes no --launcher"),
    (["--node-rank", "1", "--hostfile", "{hosts}"], "--node-rank goes with --no-ssh"),
    (["--hostfile", "{hosts}", "--env", "NCCL_DEBUG"], "expected KEY=VALUE"),
    (["--hostfile", "{hosts}", "--env", "X=a b"], "the value of X may hold only"),
    (["--hostfile", "{hosts}", "--env", "X=$(id)"], "the value of X may hold only"),
    (["--hostfile", "{hosts}", "--include", "node-a:1", "--launcher", "openmpi"], "picking slot ids"),
])
def test_argument_errors(recipe, hostfile, argv, message):
    argv = [a.replace("{hosts}", str(hostfile)) for a in argv]
    with pytest.raises(LaunchError) as e:
        plan(recipe, *argv)
    assert message in str(e.value)


def test_deepspeed_env_precedence(recipe, hostfile, tmp_path, monkeypatch):
    """This shell < ~/.deepspeed_env < ./.deepspeed_env < --env."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    (home / ".deepspeed_env").write_text("NCCL_DEBUG=INFO\nA=home\n\n# comment\n")
    (cwd / ".deepspeed_env").write_text("A=cwd\nB=cwd\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    p = plan(recipe, "--hostfile", str(hostfile), "--master-addr", "x", "--env", "B=flag",
             environ={"NCCL_DEBUG": "WARN", "GLOO_SOCKET_IFNAME": "eth1"})
    assert p.variables == {"GLOO_SOCKET_IFNAME": "eth1", "NCCL_DEBUG": "INFO", "A": "cwd", "B": "flag"}


def test_dry_run_writes_the_launch_files(recipe, hostfile, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth1")
    argv = ["launch", "-c", str(recipe), "--hostfile", str(hostfile), "--master-addr", "10.0.0.1", "--dry-run",
            "optim.lr=3e-4", 'data.shards=["' + load_config(recipe).data.shards[0] + '"]']
    args = build_parser().parse_args(argv)
    assert launch.run_from_args(args) == 0
    out = capsys.readouterr()
    printed = out.out.strip().splitlines()[-1]
    assert printed.startswith("[launch] ") and "--launcher pdsh" in printed
    assert "2 host(s) from" in out.err and "= 4 rank(s)" in out.err
    ldir = tmp_path / "run" / "launch"
    # the resolved recipe: the overrides are in it, so nothing is quoted through pdsh and ssh
    assert load_config(ldir / "config.toml") == load_config(recipe, ["optim.lr=3e-4"])
    assert (ldir / "hostfile").read_text() == "node-a slots=2\nnode-b slots=2\n"
    lines = (ldir / ".deepspeed_env").read_text().splitlines()
    assert "GLOO_SOCKET_IFNAME=eth1" in lines and all("=" in x and not x.startswith("#") for x in lines)


def test_batch_sizes_are_checked_before_anything_starts(recipe, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(LaunchError, match="with 4 rank"):
        plan(recipe, "--gpus-per-node", "4", f"train.deepspeed_config={ds}")


# -- the command line -----------------------------------------------------------------------------------

def _cli(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dupmae"), "launch", *argv], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=os.environ | {"OMP_NUM_THREADS": "1"})


def test_cli_hostfile_error_is_one_line_and_exit_2(recipe, tmp_path):
    (tmp_path / "bad").write_text("node1 slots=8\nnode2 slots=8 ; rm -rf /\n")
    t0 = time.monotonic()
    out = _cli("-c", str(recipe), "--hostfile", str(tmp_path / "bad"))
    assert out.returncode == 2
    assert out.stderr.strip() == (f"dupmae launch: error: {tmp_path / 'bad'} line 2: bad slot count '8 ; rm -rf /' "
                                  "for node2: slots must be a whole number >= 1")
    assert time.monotonic() - t0 < 60
    out = _cli("-c", str(recipe), "--hostfile", str(tmp_path / "missing"))
    assert out.returncode == 2 and "not found" in out.stderr


@pytest.mark.skipif(shutil.which("ssh") is None or shutil.which("pdsh") is None, reason="needs ssh and pdsh")
def test_cli_unresolvable_host_fails_within_seconds(recipe, tmp_path):
    (tmp_path / "hosts").write_text("no-such-host-dupmae-test.invalid slots=1\nlocalhost slots=1\n")
    t0 = time.monotonic()
    out = _cli("-c", str(recipe), "--hostfile", str(tmp_path / "hosts"))
    assert out.returncode == 2, out.stderr
    assert "not reachable over ssh" in out.stderr and "no-such-host-dupmae-test.invalid" in out.stderr
    assert time.monotonic() - t0 < 60


def test_cli_surface():
    out = subprocess.run([str(BIN / "dupmae"), "launch", "--help"], capture_output=True, text=True, timeout=60)
    for flag in ("--config", "--hostfile", "--slurm", "--nodes", "--gpus-per-node", "--include", "--exclude",
                 "--launcher", "--launcher-args", "--no-ssh", "--node-rank", "--master-addr", "--master-port",
                 "--env", "--dry-run", "--sbatch", "--partition", "--time", "--account", "--job-name"):
        assert flag in out.stdout


# -- batch scripts --------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["per-node", "slurm"])
def test_batch_script_templates(variant):
    text = template_path(variant).read_text()
    subprocess.run(["bash", "-n", str(template_path(variant))], check=True)
    for line in ("#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "trap forward_usr1 USR1", 'scancel --signal=USR1 "$SLURM_JOB_ID"', 'scontrol requeue "$SLURM_JOB_ID"',
                 'scontrol show hostnames "$SLURM_JOB_NODELIST"', "--kill-on-bad-exit=1"):
        assert line in text
    if variant == "per-node":
        assert "#SBATCH --ntasks-per-node=1" in text
        assert '--no_ssh --node_rank="$SLURM_PROCID"' in text and "trap \"\" USR1; exec deepspeed" in text
    else:
        assert "--launcher slurm --force_multi" in text


def test_generated_batch_script(tmp_path):
    settings = BatchSettings(nodes=4, gpus_per_node=8, partition="gpu", time="2-00:00:00", account="proj",
                             output="/runs/x/slurm-%j.log", chdir="/home/me/dupmae")
    text = render(template_path("per-node").read_text(), settings, ["/cfg/my recipe.toml", "optim.lr=2e-4"],
                  venv="/opt/venv")
    header = [x for x in text.splitlines() if x.startswith("#SBATCH")]
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --time=2-00:00:00", "#SBATCH --account=proj", "#SBATCH --output=/runs/x/slurm-%j.log",
                 "#SBATCH --chdir=/home/me/dupmae", "#SBATCH --signal=B:USR1@120"):
        assert line in header
    assert sum(x.startswith("#SBATCH --nodes") for x in header) == 1
    assert "[[ $# -gt 0 ]] || set -- '/cfg/my recipe.toml' optim.lr=2e-4" in text
    assert "export DUPMAE_VENV=${DUPMAE_VENV:-/opt/venv}" in text
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)
    with pytest.raises(SbatchError, match="--partition"):
        render(template_path("per-node").read_text(), BatchSettings(nodes=1, partition="gpu; rm"), ["x"])


def test_cli_writes_a_batch_script(recipe, tmp_path, capsys):
    args = build_parser().parse_args(["launch", "-c", str(recipe), "--nodes", "2", "--gpus-per-node", "4",
                                      "--partition", "a100", "--sbatch", str(tmp_path / "job.sbatch"),
                                      "--launcher", "slurm", "data.micro_batch=2"])
    assert launch.run_from_args(args) == 0
    text = (tmp_path / "job.sbatch").read_text()
    assert "--launcher slurm" in text and "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=4" in text
    assert f"#SBATCH --output={tmp_path / 'run'}/slurm-%j.log" in text and f"#SBATCH --chdir={tmp_path}" in text
    assert f"set -- {recipe} data.micro_batch=2" in text
    assert "global batch 16 (2 x 1 x 8)" in capsys.readouterr().out


# -- the examples ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, ranks", [("1x8", 8), ("4x8", 32)])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_example_deepspeed_configs(layout, ranks, stage, recipe):
    """Each example JSON with its hostfile and the paper's recipe: the global batch stays 256."""
    from dupmae.cluster.hostfile import read_hostfile

    assert sum(read_hostfile(EXAMPLES / f"hostfile-{layout}").values()) == ranks
    path = EXAMPLES / f"ds-{layout}-zero{stage}.json"
    user = json.loads(path.read_text())
    assert user["zero_optimization"]["stage"] == stage
    assert user["train_batch_size"] == user["train_micro_batch_size_per_gpu"] * user["gradient_accumulation_steps"] * ranks == 256
    micro = user["train_micro_batch_size_per_gpu"]
    cfg = load_config(ROOT / "configs" / "bert-base-wiki.toml",
                      [f"train.deepspeed_config={path}", f"zero.stage={stage}", f"data.micro_batch={micro}"])
    merged = deepspeed_config(cfg, ranks)
    assert merged["train_batch_size"] == 256 and merged["zero_optimization"]["stage"] == stage
    assert merged["bf16"]["enabled"] is True
    with pytest.raises(ConfigError, match="conflicts with the recipe"):  # another world size: refused
        deepspeed_config(load_config(ROOT / "configs" / "bert-base-wiki.toml",
                                     [f"train.deepspeed_config={path}", f"zero.stage={stage}"]), ranks * 2)
    # and the example hostfile plans to that world size
    p = plan(recipe, "--hostfile", str(EXAMPLES / f"hostfile-{layout}"), "--master-addr", "10.0.0.1",
             f"data.micro_batch={micro}")
    assert p.world_size == ranks


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_each_training_rank_leaves_its_exit_code_for_the_batch_script(tmp_path, monkeypatch, capsys, command):
    """Under the sbatch scripts (DUPMAE_EXIT_DIR) a training rank writes its exit code as rank<RANK>: the
    script requeues on a rank's 69, which srun's own code (the highest of its tasks') can hide."""
    from dupmae.engine.cli import main

    monkeypatch.setenv("DUPMAE_EXIT_DIR", str(tmp_path / "codes"))
    monkeypatch.setenv("RANK", "3")
    (tmp_path / "codes").mkdir()
    assert main([command, "-c", str(tmp_path / "missing.toml")]) == 2
    assert (tmp_path / "codes" / "rank3").read_text() == "2\n"
    assert main(["inspect", str(tmp_path / "none")]) != 0
    assert sorted(p.name for p in (tmp_path / "codes").iterdir()) == ["rank3"]  # only training commands write
    monkeypatch.setenv("DUPMAE_EXIT_DIR", str(tmp_path / "gone"))  # cannot be written: said, code unchanged
    assert main([command, "-c", str(tmp_path / "missing.toml")]) == 2
    assert "could not record the exit code" in capsys.readouterr().err


# -- what the batch scripts do when the ranks stop: requeue or not (stubs for srun, deepspeed, scontrol) -------

STUB_LAUNCHER = """#!/bin/bash
# the ranks: each leaves its exit code as the trainer does (engine/cli.py), then the launcher exits with $LAUNCH_RC
i=0
for code in $RANK_CODES; do echo "$code" > "$DUPMAE_EXIT_DIR/rank$i"; i=$((i + 1)); done
echo "launched: $*" >> "$CALLS"
exit "$LAUNCH_RC"
"""
STUB_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$CALLS"
case "$1 $2" in
  "show hostnames") printf 'node1\\nnode2\\n' ;;
  "show node") echo "NodeName=$3 NodeAddr=10.0.0.1 State=ALLOCATED" ;;
  "show job") echo "JobId=$SLURM_JOB_ID JobState=$JOB_STATE" ;;
  requeue*) exit "$REQUEUE_RC" ;;
esac
"""


def run_batch_script(variant: str, tmp_path: Path, codes: str, rc: int, *, requeue_rc: int = 0,
                     job_state: str = "RUNNING", lost_before: int = 0) -> tuple[subprocess.CompletedProcess, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", STUB_LAUNCHER), ("deepspeed", STUB_LAUNCHER), ("scontrol", STUB_SCONTROL),
                       ("dupmae", "#!/bin/bash\nexit 0\n"), ("scancel", "#!/bin/bash\nexit 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    calls.write_text("")
    job_dir = tmp_path / "jobs"
    if lost_before:
        (job_dir / "4242").mkdir(parents=True, exist_ok=True)
        (job_dir / "4242" / "rank-lost-requeues").write_text(f"{lost_before}\n")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "CALLS": str(calls),
           "RANK_CODES": codes, "LAUNCH_RC": str(rc), "REQUEUE_RC": str(requeue_rc), "JOB_STATE": job_state,
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_SUBMIT_DIR": str(tmp_path), "DUPMAE_JOB_DIR": str(job_dir), "DUPMAE_RANKS_PER_NODE": "1"}
    proc = subprocess.run(["bash", str(template_path(variant)), "recipe.toml"], env=env, capture_output=True,
                          text=True, timeout=60)
    return proc, calls.read_text()


@pytest.mark.parametrize("variant", ["per-node", "slurm"])
def test_batch_script_requeues_when_a_rank_or_node_stopped_answering(variant, tmp_path):
    """A rank's 69 (another rank hung or went away) requeues the job even though srun / the launcher reports
    another code (measured: 143 for the task srun terminated): the ranks' own codes decide."""
    proc, calls = run_batch_script(variant, tmp_path, "69 143", 143)
    assert proc.returncode == 0, proc.stderr
    assert "scontrol requeue 4242" in calls
    assert "requeueing job 4242 (1 of 3)" in proc.stdout
    assert (tmp_path / "jobs" / "4242" / "rank-lost-requeues").read_text().strip() == "1"
    assert (tmp_path / "jobs" / "4242" / "exit-codes" / "restart-0" / "rank0").read_text().strip() == "69"


@pytest.mark.parametrize("variant", ["per-node", "slurm"])
@pytest.mark.parametrize("codes,rc", [("69 2", 2), ("3 69", 3), ("69 74", 74), ("1 1", 1), ("0 0", 0)])
def test_batch_script_does_not_requeue_what_a_restart_cannot_fix(variant, codes, rc, tmp_path):
    """Bad input (2), non-finite losses (3), a full disk (74), an unexplained failure (1), a finished run (0):
    the job ends with the launcher's code, no requeue."""
    proc, calls = run_batch_script(variant, tmp_path, codes, rc)
    assert proc.returncode == rc, proc.stderr
    assert "requeue" not in calls
    assert "finished" in proc.stdout and f"exit {rc}" in proc.stdout


@pytest.mark.parametrize("variant", ["per-node", "slurm"])
def test_batch_script_stops_requeueing_a_fault_that_keeps_coming_back(variant, tmp_path):
    proc, calls = run_batch_script(variant, tmp_path, "69 143", 143, lost_before=3)
    assert proc.returncode == 143
    assert "requeue" not in calls
    assert "3 requeues already, not requeueing" in proc.stderr


@pytest.mark.parametrize("variant", ["per-node", "slurm"])
def test_batch_script_preempted_run_is_requeued(variant, tmp_path):
    proc, calls = run_batch_script(variant, tmp_path, "75 75", 75)
    assert proc.returncode == 0 and "scontrol requeue 4242" in calls
    assert not (tmp_path / "jobs" / "4242" / "rank-lost-requeues").exists()  # preemptions are not counted


@pytest.mark.parametrize("variant", ["per-node", "slurm"])
@pytest.mark.parametrize("state,rc,message", [("PENDING", 0, "Slurm has already requeued job 4242"),
                                              ("FAILED", 143, "scontrol requeue failed")])
def test_batch_script_when_its_requeue_is_refused(variant, state, rc, message, tmp_path):
    """After a node failure Slurm may cancel and requeue the job itself a moment before the script's own
    `scontrol requeue`, which then fails: the script says so and exits 0; any other refusal is an error."""
    proc, calls = run_batch_script(variant, tmp_path, "69 143", 143, requeue_rc=1, job_state=state)
    assert proc.returncode == rc
    assert message in proc.stdout + proc.stderr
