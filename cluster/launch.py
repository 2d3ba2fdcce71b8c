"""`dupmae launch`: pre-training through the deepspeed launcher, on this machine, on the hosts of a hostfile,
or on a Slurm allocation; or a Slurm batch script for it.

    dupmae launch -c X.toml --gpus-per-node 2                          # this machine
    dupmae launch -c X.toml --hostfile hosts                           # every host, over pdsh + ssh
    dupmae launch -c X.toml --hostfile hosts --no-ssh --node-rank R    # run once per node, R = 0..N-1
    dupmae launch -c X.toml --slurm [--launcher slurm]                 # inside salloc/sbatch
    dupmae launch -c X.toml --nodes 4 --gpus-per-node 8 --sbatch job.sbatch   # then: sbatch job.sbatch

In order: the recipe and overrides are loaded and the DeepSpeed batch sizes checked (errors end here,
before anything starts); the hosts and slots are resolved (hostfile or Slurm, --include/--exclude,
--nodes, --gpus-per-node) and checked; with the pdsh and openmpi runners every host must answer over ssh;
the master address is found; RUN_DIR/launch/ receives config.toml (the resolved recipe: every rank reads
it, so no override is quoted through pdsh, ssh or mpirun), hostfile (the hosts and slots used) and
.deepspeed_env (the variables every node needs, see `node_variables`); the command is printed and this
process becomes it, so its exit code is the job's (75: stopped by a signal after saving a checkpoint).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .hostfile import (HostfileError, format_hostfile, hostfile_from_slurm, read_hostfile, select,
                       slurm_node_addr, slurm_slots_per_node)
from .slurm import BatchSettings, SbatchError, write_sbatch

RUNNERS = ("pdsh", "openmpi", "slurm")
DEFAULT_PORT = 29500
# variables of the launching shell that every rank needs on every node (when set); DeepSpeed itself
# forwards PYTHON*, UCX_*, MLFLOW*, MV2_* and, on GPUs, NCCL_*
FORWARD_EXACT = ("PATH", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM",
                 "CUDA_DEVICE_MAX_CONNECTIONS", "PYTORCH_CUDA_ALLOC_CONF", "TP_SOCKET_IFNAME")
FORWARD_PREFIXES = ("NCCL_", "GLOO_", "FI_", "TORCH_", "TRITON_", "HF_", "TRANSFORMERS_", "DUPMAE_")
# what DeepSpeed writes unquoted into `export K=V;` (pdsh), `-x K=V` (mpirun), `--export=...,K=V` (srun)
_PLAIN_VALUE = re.compile(r"^[\w@%+=:,./-]*$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LaunchError(Exception):
    """A user-facing launch problem (bad hostfile, unreachable host, bad arguments): exit code 2."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="a TOML recipe, e.g. configs/bert-base-wiki.toml")
    p.add_argument("overrides", nargs="*", help="section.key=value (as for dupmae pretrain / finetune)")
    p.add_argument("--task", choices=("pretrain", "finetune"), default="pretrain",
                   help="the job the ranks run: dupmae pretrain (default) or dupmae finetune (same trainer)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hostfile", "-H", help="hosts and slots, one 'HOST slots=N' line per host")
    where.add_argument("--slurm", action="store_true",
                       help="the nodes of the Slurm allocation this runs in (scontrol show hostnames)")
    p.add_argument("--nodes", type=int, default=0, help="use the first N hosts (with --sbatch: nodes to request)")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="ranks per host (default: the hostfile's slots; Slurm's GPUs per node; local GPUs or 1)")
    p.add_argument("--include", "-i", default="", help="only these hosts/slots: NAME[:SLOT[,SLOT]][@NAME...]")
    p.add_argument("--exclude", "-e", default="", help="all but these hosts/slots (same syntax)")
    p.add_argument("--launcher", choices=RUNNERS, default="pdsh",
                   help="how the deepspeed launcher reaches the hosts: pdsh (ssh, default), openmpi (mpirun), "
                        "slurm (srun, inside an allocation)")
    p.add_argument("--launcher-args", default="", help="extra arguments for pdsh / mpirun / srun, one string")
    p.add_argument("--no-ssh", action="store_true",
                   help="start only this node's ranks (run the same command on every node with its --node-rank)")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this node's index in the hostfile, with --no-ssh (with --slurm: $SLURM_NODEID)")
    p.add_argument("--master-addr", default=None,
                   help="rank 0's address (default: Slurm's NodeAddr, the first host's address, or its "
                        "`hostname -I` over ssh)")
    p.add_argument("--master-port", type=int, default=None,
                   help=f"rendezvous port (default {DEFAULT_PORT}; with --slurm {DEFAULT_PORT} + job id %% 1000)")
    p.add_argument("--ssh-port", type=int, default=None, help="sshd port on the hosts (default: ssh's own)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="a variable for every rank on every node (repeatable); wins over the shell and the "
                        ".deepspeed_env files")
    p.add_argument("--dry-run", action="store_true",
                   help="check, write RUN_DIR/launch/ and print the command, but do not run it (no ssh probe)")
    batch = p.add_argument_group("batch script (--sbatch)")
    batch.add_argument("--sbatch", metavar="OUT", help="write a Slurm batch script for this run instead of running")
    batch.add_argument("--partition", default=None)
    batch.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    batch.add_argument("--account", default=None)
    batch.add_argument("--job-name", default="dupmae")


@dataclass
class Plan:
    command: list[str]
    runner: str  # local | pdsh | openmpi | slurm | no-ssh
    launch_dir: Path
    hosts: OrderedDict[str, list[int]] = field(default_factory=OrderedDict)  # host -> slot ids used
    hostfile_text: str | None = None  # written to launch_dir/hostfile
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    variables: dict[str, str] = field(default_factory=dict)  # .deepspeed_env
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return sum(len(s) for s in self.hosts.values())

    @property
    def env_file(self) -> Path:
        return self.launch_dir / ".deepspeed_env"


def run_from_args(args) -> int:
    try:
        return _run(args)
    except (HostfileError, SbatchError) as e:
        raise LaunchError(str(e)) from None


def _run(args) -> int:
    from dupmae.engine.config import load_config, to_toml

    if getattr(args, "task", "pretrain") == "finetune":
        from dupmae.engine.finetune.task import FinetuneConfig

        cfg = load_config(args.config, args.overrides, cls=FinetuneConfig)
    else:
        cfg = load_config(args.config, args.overrides)
    if args.sbatch:
        return _write_batch_script(args, cfg)
    plan = plan_launch(args, cfg, probe=not args.dry_run)
    plan.launch_dir.mkdir(parents=True, exist_ok=True)
    _write(plan.launch_dir / "config.toml", to_toml(cfg))
    if plan.hostfile_text is not None:
        _write(plan.launch_dir / "hostfile", plan.hostfile_text)
    _write(plan.env_file, "".join(f"{k}={v}\n" for k, v in plan.variables.items()))
    for note in plan.notes:
        print(f"[launch] {note}", file=sys.stderr)
    print(f"[launch] {shlex.join(plan.command)}", flush=True)
    if args.dry_run:
        return 0
    env = dict(os.environ) | plan.variables
    if plan.runner in ("pdsh", "openmpi"):
        env["DS_ENV_FILE"] = str(plan.env_file)  # an absolute name: DeepSpeed reads it instead of ./.deepspeed_env
    sys.stderr.flush()
    os.execvpe(plan.command[0], plan.command, env)  # never returns


def _write(path: Path, text: str) -> None:
    """Replace `path` whole: with --no-ssh every node writes the same files on a shared disk while ranks
    of nodes already started read them."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def check_batch_sizes(cfg, world_size: int) -> None:
    """The DeepSpeed configuration the ranks will build for this world size (batch sizes, a user's JSON):
    refused here, before any node starts, rather than on every rank."""
    from dupmae.engine.config import ConfigError
    from dupmae.engine.trainer import deepspeed_config

    try:
        deepspeed_config(cfg, world_size)
    except ConfigError as e:
        raise LaunchError(f"with {world_size} rank(s): {e}") from None


# -- the plan -----------------------------------------------------------------------------------------

def plan_launch(args, cfg, probe: bool = True, environ: dict | None = None) -> Plan:
    """The deepspeed command and what goes with it. `probe`: ask the hosts over ssh (reachability, and
    the master address when nothing else gives it)."""
    environ = os.environ if environ is None else environ
    launch_dir = Path(cfg.train.run_dir).resolve() / "launch"
    config_path = launch_dir / "config.toml"
    _check_arguments(args, environ)
    tail = ["--no_local_rank", _executable("dupmae"), getattr(args, "task", "pretrain"), "--config", str(config_path)]
    deepspeed = [_executable("deepspeed")]
    port = args.master_port or (DEFAULT_PORT + int(environ["SLURM_JOB_ID"]) % 1000
                                if args.slurm and environ.get("SLURM_JOB_ID", "").isdigit() else DEFAULT_PORT)
    variables = node_variables(args.env, environ)

    if not args.hostfile and not args.slurm:
        ranks = args.gpus_per_node or _local_gpu_count() or 1
        check_batch_sizes(cfg, ranks)
        plan = Plan(command=deepspeed + ["--num_gpus", str(ranks), "--master_port", str(port)] + tail,
                    runner="local", launch_dir=launch_dir, hosts=OrderedDict(localhost=list(range(ranks))),
                    master_port=port, variables=variables)
        plan.notes.append(f"this machine: {ranks} rank(s)")
        return plan

    if args.slurm:
        slots = args.gpus_per_node or slurm_slots_per_node(environ) or _local_gpu_count() or 1
        pool = hostfile_from_slurm(slots, environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST"))
        active = select(pool, args.include, args.exclude, args.nodes)
        source = "the Slurm allocation"
    else:
        pool = read_hostfile(args.hostfile)
        active = select(pool, args.include, args.exclude, args.nodes, args.gpus_per_node)
        source = args.hostfile
    plan = Plan(command=[], runner="no-ssh" if args.no_ssh else args.launcher, launch_dir=launch_dir,
                hosts=active, master_port=port, variables=variables)
    if all(slots == list(range(len(slots))) for slots in active.values()):
        plan.hostfile_text = format_hostfile({h: len(s) for h, s in active.items()})
        hostfile_args = ["--hostfile", str(launch_dir / "hostfile")]
    else:  # particular slot ids (GPU ids) picked: only DeepSpeed's own filter can say which
        if args.slurm or plan.runner not in ("pdsh", "no-ssh"):
            raise LaunchError("picking slot ids with --include/--exclude works with a hostfile and the pdsh "
                              "runner or --no-ssh only; filter whole hosts instead")
        hostfile_args = ["--hostfile", str(Path(args.hostfile).resolve())]
        hostfile_args += ["--include", args.include] if args.include else ["--exclude", args.exclude]
    plan.notes.append(f"{len(active)} host(s) from {source}: "
                      + ", ".join(f"{h} x{len(s)}" for h, s in active.items()) + f" = {plan.world_size} rank(s)")
    check_batch_sizes(cfg, plan.world_size)
    first = next(iter(active))
    only_here = len(active) == 1 and _is_this_machine(first)

    addresses: dict[str, str] = {}
    if plan.runner in ("pdsh", "openmpi") and not only_here:
        _require(plan.runner)
        if probe:
            addresses = probe_hosts(list(active), args.ssh_port)
    plan.master_addr = (args.master_addr or (slurm_node_addr(first) if args.slurm else None)
                        or ("127.0.0.1" if only_here else None) or _resolve(first) or addresses.get(first))
    if not plan.master_addr:
        if plan.runner in ("pdsh", "openmpi") and not probe:
            plan.master_addr = first  # a dry run asks no host; the real run asks it over ssh
        else:
            raise LaunchError(f"cannot find the address of {first} (rank 0): its name does not resolve here; "
                              "give --master-addr")
    master = ["--master_addr", plan.master_addr, "--master_port", str(port)]
    plan.notes.append(f"master {plan.master_addr}:{port}")

    if plan.runner == "no-ssh":
        rank = args.node_rank if args.node_rank is not None else int(environ.get("SLURM_NODEID", "-1"))
        if not 0 <= rank < len(active):
            raise LaunchError(f"--no-ssh: --node-rank must be 0..{len(active) - 1} (this node's line in the "
                              f"hostfile), got {rank if rank >= 0 else 'none'}")
        plan.command = deepspeed + hostfile_args + ["--no_ssh", "--node_rank", str(rank)] + master + tail
    elif plan.runner == "pdsh":
        plan.command = (deepspeed + hostfile_args + ["--launcher", "pdsh", "--no_ssh_check"] + master
                        + (["--force_multi"] if len(active) == 1 and not only_here else [])
                        + (["--ssh_port", str(args.ssh_port)] if args.ssh_port else [])
                        + (["--launcher_args", args.launcher_args] if args.launcher_args else []) + tail)
    elif plan.runner == "openmpi":
        if environ.get("OMPI_ALLOW_RUN_AS_ROOT") is None and os.geteuid() == 0:
            plan.variables |= {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
        plan.command = (deepspeed + hostfile_args + ["--launcher", "openmpi"] + master
                        + (["--force_multi"] if len(active) == 1 else [])
                        + ["--launcher_args", _mpirun_args(args.launcher_args, plan.variables)] + tail)
    else:  # slurm
        if not environ.get("SLURM_JOB_ID"):
            raise LaunchError("--launcher slurm runs srun: start it inside an allocation (sbatch, salloc)")
        _require("slurm")
        per_node = {len(s) for s in active.values()}
        if len(per_node) != 1:
            raise LaunchError("--launcher slurm needs the same number of slots on every host")
        srun = f"--kill-on-bad-exit=1 --ntasks-per-node={per_node.pop()} {args.launcher_args}".strip()
        # srun passes the environment on (--export=ALL); the rendezvous is ours, not derived again per rank
        plan.variables |= {"MASTER_ADDR": plan.master_addr, "MASTER_PORT": str(port)}
        plan.command = (deepspeed + hostfile_args + ["--launcher", "slurm", "--force_multi", "--launcher_args", srun]
                        + master + tail)
    return plan


def _check_arguments(args, environ: dict) -> None:
    if args.nodes < 0 or args.gpus_per_node < 0:
        raise LaunchError("--nodes and --gpus-per-node must be >= 0")
    if args.master_port is not None and not 0 < args.master_port < 65536:
        raise LaunchError(f"--master-port {args.master_port} is not a port number")
    local = not args.hostfile and not args.slurm
    if local and (args.include or args.exclude or args.nodes > 1 or args.no_ssh or args.launcher != "pdsh"):
        raise LaunchError("--include/--exclude, --nodes > 1, --no-ssh and --launcher need --hostfile or --slurm "
                          "(without them the run is on this machine)")
    if args.no_ssh and args.launcher != "pdsh":
        raise LaunchError("--no-ssh starts this node's ranks itself: it takes no --launcher")
    if args.node_rank is not None and not args.no_ssh:
        raise LaunchError("--node-rank goes with --no-ssh")
    if args.slurm and not (environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")):
        raise LaunchError("--slurm: SLURM_JOB_NODELIST is not set; run it inside an allocation (sbatch, salloc)")


def node_variables(assignments: list[str], environ: dict) -> dict[str, str]:
    """What every rank on every node gets (RUN_DIR/launch/.deepspeed_env), lowest precedence first: the
    variables of this shell that matter to a rank (FORWARD_*), then ~/.deepspeed_env and ./.deepspeed_env
    (DeepSpeed's own files, which it no longer reads itself once DS_ENV_FILE names ours), then --env."""
    found: dict[str, str] = {}
    for key, value in sorted(environ.items()):
        if key in FORWARD_EXACT or key.startswith(FORWARD_PREFIXES):
            if _PLAIN_VALUE.match(value):
                found[key] = value
            else:
                print(f"[launch] not forwarding {key}: its value has spaces or shell characters "
                      "(set it with --env in a plain form, or in the nodes' shell profile)", file=sys.stderr)
    for path in (Path.home() / ".deepspeed_env", Path.cwd() / ".deepspeed_env"):
        if path.is_file():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip() and not line.lstrip().startswith("#"):
                    key, value = _assignment(line.strip(), f"{path} line {number}")
                    found[key] = value
    for text in assignments:
        key, value = _assignment(text, "--env")
        found[key] = value
    return found


def _assignment(text: str, where: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not _KEY.match(key):
        raise LaunchError(f"{where}: expected KEY=VALUE, got {text!r}")
    if not _PLAIN_VALUE.match(value):
        raise LaunchError(f"{where}: the value of {key} may hold only letters, digits and _ @ % + = : , . / - "
                          "(the launchers pass it through a remote shell or mpirun unquoted)")
    return key, value


def _mpirun_args(user: str, variables: dict[str, str]) -> str:
    """DeepSpeed's openmpi runner adds `--mca btl_tcp_if_include eth0` unless told otherwise: use the
    interface the ranks are told to use (GLOO_/NCCL_SOCKET_IFNAME), also for Open MPI's own wire-up."""
    if "btl_tcp_if_include" in user:
        return user
    ifname = variables.get("GLOO_SOCKET_IFNAME") or variables.get("NCCL_SOCKET_IFNAME")
    if not ifname or not re.fullmatch(r"[\w.-]+", ifname):
        return user
    return f"--mca btl_tcp_if_include {ifname} --mca oob_tcp_if_include {ifname} {user}".strip()


# -- hosts ----------------------------------------------------------------------------------------------

def probe_hosts(hosts: list[str], ssh_port: int | None = None, timeout_s: int = 10) -> dict[str, str]:
    """Each host's first address (`hostname -I`), asked over ssh exactly as pdsh will; a host that does not
    answer is an error naming it and ssh's reason."""
    if shutil.which("ssh") is None:
        raise LaunchError("ssh not found: the pdsh and openmpi runners reach the hosts over ssh "
                          "(or use --no-ssh on every node, or --launcher slurm)")

    def ask(host: str) -> tuple[str, int, str, str]:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout_s}"]
        cmd += ["-p", str(ssh_port)] if ssh_port else []
        try:
            out = subprocess.run(cmd + [host, "hostname -I"], capture_output=True, text=True,
                                 timeout=timeout_s + 10, stdin=subprocess.DEVNULL)
            return host, out.returncode, out.stdout, out.stderr
        except subprocess.TimeoutExpired:
            return host, -1, "", f"no answer within {timeout_s + 10} s"

    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        answers = list(pool.map(ask, hosts))
    failed = [(h, (err.strip().splitlines() or [f"exit {rc}"])[-1]) for h, rc, _, err in answers if rc != 0]
    if failed:
        shown = "; ".join(f"{h}: {why}" for h, why in failed[:8]) + (" ..." if len(failed) > 8 else "")
        raise LaunchError(f"{len(failed)} of {len(hosts)} host(s) not reachable over ssh ({shown}). The "
                          "deepspeed launcher needs passwordless ssh from here to every host: check the names, "
                          "`ssh HOST hostname`, or drop hosts with --exclude")
    return {h: (out.split() or [""])[0] for h, _, out, _ in answers}


def _resolve(host: str) -> str | None:
    """The host's IPv4 address if its name resolves here to something other than loopback."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return None
    addrs = [i[4][0] for i in infos if not i[4][0].startswith("127.")]
    return addrs[0] if addrs else None


def _is_this_machine(host: str) -> bool:
    name = socket.gethostname()
    return host in ("localhost", "127.0.0.1", name, name.split(".")[0], socket.getfqdn())


def _local_gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0


def _executable(name: str) -> str:
    """`name` from this Python's environment (what the ranks must run), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        raise LaunchError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def _require(runner: str) -> None:
    tool = {"pdsh": "pdsh", "openmpi": "ompi_info", "slurm": "sinfo"}[runner]
    if shutil.which(tool) is None:
        hint = {"pdsh": "install pdsh, or use --launcher openmpi / --launcher slurm / --no-ssh per node",
                "openmpi": "install Open MPI (Debian: openmpi-bin), or use the pdsh runner",
                "slurm": "run inside a Slurm allocation with the Slurm client commands on PATH"}[runner]
        raise LaunchError(f"the {runner} runner needs {tool}, which is not on PATH: {hint}")


# -- batch scripts --------------------------------------------------------------------------------------

def _write_batch_script(args, cfg) -> int:
    if args.hostfile or args.slurm or args.no_ssh or args.include or args.exclude:
        raise LaunchError("--sbatch writes a script that takes its nodes from Slurm: give --nodes and "
                          "--gpus-per-node, not --hostfile/--slurm/--no-ssh/--include/--exclude")
    if args.launcher == "openmpi":
        raise LaunchError("--sbatch: the batch scripts use one deepspeed launcher per node (default) or "
                          "--launcher slurm; not openmpi")
    nodes = args.nodes or 1
    ranks = nodes * max(args.gpus_per_node, 1)
    check_batch_sizes(cfg, ranks)
    run_dir = Path(cfg.train.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = BatchSettings(nodes=nodes, gpus_per_node=args.gpus_per_node, partition=args.partition,
                             time=args.time, account=args.account, job_name=args.job_name,
                             output=str(run_dir / "slurm-%j.log"), chdir=str(Path.cwd()))
    venv = sys.prefix if sys.prefix != sys.base_prefix else None
    variant = "slurm" if args.launcher == "slurm" else "per-node"
    out = write_sbatch(args.sbatch, variant, settings, [str(Path(args.config).resolve()), *args.overrides], venv,
                       task=getattr(args, "task", "pretrain"))
    d = cfg.data
    print(f"[launch] wrote {out}: {nodes} node(s) x {max(args.gpus_per_node, 1)} rank(s), global batch "
          f"{d.micro_batch * d.grad_accum * ranks} ({d.micro_batch} x {d.grad_accum} x {ranks}), log "
          f"{settings.output}\n[launch] submit it with: sbatch {shlex.quote(str(out))}")
    return 0
