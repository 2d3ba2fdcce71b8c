"""A real two-node cluster on this machine, for the `cluster` tests (see ../shared/notes/cluster-local.md).

Each "node" is a network namespace with its own address on a private bridge and its own hostname, running
one slurmd and one sshd; munge and the Slurm controller run in the root namespace on the bridge address.
Slurm is Debian's slurm-wlm (real daemons, real sbatch/srun/scancel), ssh is real OpenSSH, so the
deepspeed launcher's pdsh, --no_ssh and slurm runners run exactly as on a cluster.

Everything gets a random name and subnet per session (parallel sessions cannot clash) and lives in one
directory; `stop()` ends the jobs, then only the processes this fixture started (its daemons by process
group, and whatever is left inside its own namespaces), then removes the namespaces, the bridge and the
directory. Needs root; `unavailable_reason()` says why not, and the fixture skips with that reason.

    def test_x(local_cluster):
        job = local_cluster.sbatch(["cluster/slurm/pretrain.sbatch", "recipe.toml"], cwd=tmp_path)
        info = local_cluster.wait_job(job, timeout=120)
"""
from __future__ import annotations

import atexit
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# executable -> Debian package
NEEDED = {"ip": "iproute2", "nsenter": "util-linux", "unshare": "util-linux", "setpriv": "util-linux",
          "munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client",
          "sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client", "pdsh": "pdsh"}
SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
# slurmctld pings a node every SlurmdTimeout/3 s and sets it DOWN after SlurmdTimeout s without an answer; a DOWN
# node that stopped answering is not pinged again, only asked to register every 20th ping cycle (Slurm's
# MAX_REG_FREQUENCY), so one that comes back with nothing of its own to send returns to service (ReturnToService=2)
# up to 20 * SlurmdTimeout/3 s later: 200 s here (147 and 157 s measured after a link was down ~50 s)
SLURMD_TIMEOUT_S = 30
REREGISTER_PERIOD_S = 20 * SLURMD_TIMEOUT_S // 3
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


class ClusterUnavailable(RuntimeError):
    """This machine cannot host the cluster (not a bug in the code under test): the tests skip."""


def _which(exe: str) -> str | None:
    return shutil.which(exe) or next((f"{d}/{exe}" for d in SBIN if os.access(f"{d}/{exe}", os.X_OK)), None)


def _run(cmd: list[str], timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> exit {out.returncode}: {out.stderr.strip() or out.stdout.strip()}")
    return out


def unavailable_reason() -> str | None:
    """Why the cluster cannot run here, or None."""
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (network namespaces, Slurm and sshd daemons)"
    missing = sorted({pkg for exe, pkg in NEEDED.items() if _which(exe) is None})
    if missing:
        return (f"missing packages: {' '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge "
                "openssh-server pdsh; scripts/test.sh installs them when run as root)")
    probe = f"dmprobe{os.getpid()}"
    made = _run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"cannot create network namespaces here (ip netns add: {made.stderr.strip()})"
    _run(["ip", "netns", "del", probe], check=False)
    return None


@dataclass
class Node:
    name: str  # Slurm node name = hostname inside the namespace = ssh host alias
    netns: str
    addr: str
    veth: str


class LocalCluster:
    def __init__(self, n_nodes: int = 2):
        self.tag = f"{random.randrange(16**4):04x}"
        self.subnet = self._pick_subnet()
        self.bridge = f"br-dm{self.tag}"
        self.head_addr = f"{self.subnet}.254"
        self.nodes = [Node(name=f"dm{self.tag}n{i}", netns=f"dm{self.tag}n{i}", addr=f"{self.subnet}.{i}",
                           veth=f"vdm{self.tag}{i}") for i in range(1, n_nodes + 1)]
        # a host ssh knows by name whose address nothing answers on: an unreachable node
        self.ghost = Node(name=f"dm{self.tag}ghost", netns="", addr=f"{self.subnet}.200", veth="")
        self.dir = Path(tempfile.mkdtemp(prefix=f"dupmae-cluster-{self.tag}-"))
        self.dir.chmod(0o755)  # munged (user munge) must reach its socket and key below
        self.conf = self.dir / "slurm.conf"
        self.bin = self.dir / "bin"  # the ssh wrapper, first on PATH for everything the tests start
        self._daemons: list[tuple[str, subprocess.Popen]] = []
        self._undo: list[tuple[str, list[str]]] = []  # commands that remove what was created, run in reverse
        self._made_run_sshd = False
        self._stopped = False
        atexit.register(self.stop)

    # -- bring-up ------------------------------------------------------------------------------------

    @staticmethod
    def _pick_subnet() -> str:
        used = _run(["ip", "-o", "-4", "addr", "show"]).stdout + _run(["ip", "-4", "route", "show"]).stdout
        for _ in range(200):
            subnet = f"10.{random.randint(201, 250)}.{random.randint(0, 255)}"
            if f" {subnet}." not in used and f"{subnet}.0/" not in used:
                return subnet
        raise ClusterUnavailable("no free 10.x.y.0/24 subnet found for the test bridge")

    def start(self) -> "LocalCluster":
        t0 = time.monotonic()
        self._network()
        self._munge()
        self._ssh_files()
        self._slurm_conf()
        self._daemon("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        for node in self.nodes:
            self._in_node(node, "slurmd", [_which("slurmd"), "-D", "-N", node.name, "-f", str(self.conf)])
            self._in_node(node, "sshd", [_which("sshd"), "-D", "-e", "-f", str(self.dir / f"sshd-{node.name}.conf")])
        self._wait_ready(timeout=60)
        self.startup_s = time.monotonic() - t0
        return self

    def _undoable(self, make: list[str], undo: list[str]) -> None:
        out = _run(make, check=False)
        if out.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(make)}: {out.stderr.strip()}")
        self._undo.append((" ".join(undo), undo))

    def _network(self) -> None:
        # the bridge and its address first: without the address, packets to the subnet leave by the default route
        self._undoable(["ip", "link", "add", self.bridge, "type", "bridge"], ["ip", "link", "del", self.bridge])
        _run(["ip", "addr", "add", f"{self.head_addr}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for node in self.nodes:
            self._undoable(["ip", "netns", "add", node.netns], ["ip", "netns", "del", node.netns])
            # the node's end is called eth1 in every namespace, so one GLOO_SOCKET_IFNAME=eth1 serves all nodes
            self._undoable(["ip", "link", "add", "eth1", "netns", node.netns, "type", "veth", "peer", "name", node.veth],
                           ["ip", "link", "del", node.veth])
            _run(["ip", "link", "set", node.veth, "master", self.bridge, "up"])
            _run(["ip", "-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", "eth1"])
            _run(["ip", "-n", node.netns, "link", "set", "eth1", "up"])
            _run(["ip", "-n", node.netns, "link", "set", "lo", "up"])

    def _daemon(self, name: str, cmd: list[str]) -> subprocess.Popen:
        """A daemon in the foreground, in a session of its own (so it and only it can be ended)."""
        log = open(self.dir / "log" / f"{name}.out", "ab")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=self.dir)
        log.close()
        self._daemons.append((name, proc))
        return proc

    def _in_node(self, node: Node, what: str, cmd: list[str]) -> None:
        # nsenter, not `ip netns exec`: that one remounts /sys and slurmd then fails its cgroup set-up
        wrapped = ["nsenter", f"--net=/run/netns/{node.netns}", "--", "unshare", "--uts", "--",
                   "sh", "-c", 'hostname "$0" && exec "$@"', node.name, *cmd]
        self._daemon(f"{what}-{node.name}", wrapped)

    def _munge(self) -> None:
        (self.dir / "log").mkdir()
        mdir = self.dir / "munge"
        mdir.mkdir(mode=0o755)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        shutil.chown(mdir, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        self.munge_socket = mdir / "munge.sock"
        self._daemon("munged", [_which("setpriv"), "--reuid=munge", "--regid=munge", "--init-groups",
                                _which("munged"), "--foreground", f"--socket={self.munge_socket}",
                                f"--key-file={key}", f"--pid-file={mdir / 'munged.pid'}",
                                f"--log-file={mdir / 'munged.log'}", f"--seed-file={mdir / 'munged.seed'}"])
        _wait(lambda: self.munge_socket.exists(), 15, "munged did not create its socket",
              lambda: (mdir / "munged.log").read_text() if (mdir / "munged.log").exists() else "")

    def _ssh_files(self) -> None:
        sdir = self.dir / "ssh"
        sdir.mkdir(mode=0o700)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(sdir / "host_key")])
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(sdir / "id_ed25519")])
        shutil.copy(sdir / "id_ed25519.pub", sdir / "authorized_keys")
        if not Path("/run/sshd").exists():  # sshd's privilege-separation directory
            Path("/run/sshd").mkdir(mode=0o755, parents=True)
            self._made_run_sshd = True
        for node in self.nodes:
            (self.dir / f"sshd-{node.name}.conf").write_text(
                f"ListenAddress {node.addr}\nPort 22\nHostKey {sdir / 'host_key'}\n"
                f"AuthorizedKeysFile {sdir / 'authorized_keys'}\nPidFile {sdir / ('sshd-' + node.name + '.pid')}\n"
                "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPrintMotd no\nMaxStartups 50\n")
        hosts = "".join(f"Host {n.name}\n  HostName {n.addr}\n" for n in [*self.nodes, self.ghost])
        (sdir / "config").write_text(
            hosts + f"Host *\n  User root\n  IdentityFile {sdir / 'id_ed25519'}\n  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  GlobalKnownHostsFile /dev/null\n"
            "  BatchMode yes\n  LogLevel ERROR\n  ConnectTimeout 5\n")
        # the deepspeed launcher and pdsh run plain `ssh HOST ...`: a wrapper first on PATH adds our config
        self.bin.mkdir()
        wrapper = self.bin / "ssh"
        wrapper.write_text(f"#!/bin/sh\nexec {_which('ssh')} -F {sdir / 'config'} \"$@\"\n")
        wrapper.chmod(0o755)

    def _slurm_conf(self) -> None:
        sd = self.dir / "slurm"
        for sub in ["state", *(f"spool/{n.name}" for n in self.nodes), *(f"tmp/{n.name}" for n in self.nodes)]:
            (sd / sub).mkdir(parents=True)
        with socket.socket() as s:  # the controller listens in the root namespace: a free port there
            s.bind(("", 0))
            self.ctld_port = s.getsockname()[1]
        nodes = "".join(f"NodeName={n.name} NodeAddr={n.addr} NodeHostname={n.name} CPUs=1 State=UNKNOWN\n"
                        for n in self.nodes)
        self.conf.write_text(f"""\
ClusterName=dm{self.tag}
SlurmctldHost={socket.gethostname().split('.')[0]}({self.head_addr})
SlurmctldPort={self.ctld_port}
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
StateSaveLocation={sd}/state
SlurmdSpoolDir={sd}/spool/%n
SlurmctldPidFile={sd}/slurmctld.pid
SlurmdPidFile={sd}/slurmd-%n.pid
SlurmctldLogFile={self.dir}/log/slurmctld.log
SlurmdLogFile={self.dir}/log/slurmd-%n.log
TmpFS={sd}/tmp/%n
SlurmctldTimeout=30
SlurmdTimeout={SLURMD_TIMEOUT_S}
MessageTimeout=10
KillWait=5
MinJobAge=600
InactiveLimit=0
{nodes}PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _wait_ready(self, timeout: float) -> None:
        def nodes_idle() -> bool:
            self._check_daemons()
            out = _run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env(), check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            return all(states.get(n.name, "").rstrip("*") == "idle" for n in self.nodes)

        _wait(nodes_idle, timeout, "the Slurm nodes did not become idle", self.logs)
        for node in self.nodes:
            _wait(lambda: self.ssh(node.name, "hostname", check=False).stdout.strip() == node.name, timeout,
                  f"ssh to {node.name} did not work", self.logs)

    def _check_daemons(self) -> None:
        dead = [(name, p.returncode) for name, p in self._daemons if p.poll() is not None]
        if dead:
            raise RuntimeError(f"daemon(s) exited during bring-up: {dead}\n{self.logs()}")

    # -- use -----------------------------------------------------------------------------------------

    def env(self, **extra: str) -> dict:
        """The environment for commands run against this cluster: its slurm.conf, the ssh wrapper and this
        Python's bin directory first on PATH, one thread per rank, gloo on the nodes' eth1; no Slurm or rank
        variables from outside."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "OMPI_", "PMIX_"))
               and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(SLURM_CONF=str(self.conf), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="eth1",
                   PATH=os.pathsep.join([str(self.bin), str(Path(sys.executable).parent), env.get("PATH", "")]))
        env.update(extra)
        return env

    def ssh(self, host: str, command: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
        return _run([str(self.bin / "ssh"), host, command], check=check, timeout=timeout)

    def in_node(self, node: Node, cmd: list[str]) -> list[str]:
        """`cmd` as if run on `node`: in its network namespace, under its hostname."""
        return ["nsenter", f"--net=/run/netns/{node.netns}", "--", "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', node.name, *cmd]

    def scontrol(self, *args: str) -> str:
        return _run(["scontrol", *args], env=self.env()).stdout

    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None) -> str:
        out = _run(["timeout", "30", "sbatch", "--parsable", *args], cwd=cwd, env=env or self.env(), timeout=40)
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        out = _run(["scontrol", "show", "job", "-o", job_id], env=self.env(), check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: str, timeout: float, until=None) -> dict:
        """Poll until the job reaches a terminal state (or `until(info)` is true); returns its info."""
        done = until or (lambda info: info.get("JobState") in TERMINAL_STATES)
        info = {}

        def check() -> bool:
            nonlocal info
            info = self.job(job_id)
            return done(info)

        _wait(check, timeout, f"job {job_id} did not finish", lambda: f"last state: {info}\n{self.logs()}")
        return info

    def node_pids(self, node: Node) -> list[int]:
        out = _run(["ip", "netns", "pids", node.netns], check=False).stdout
        return [int(p) for p in out.split()]

    def daemon_pids(self) -> set[int]:
        return {p.pid for _, p in self._daemons}

    def leftover_processes(self) -> dict[int, str]:
        """Processes inside the nodes that are not the daemons (i.e. job processes): pid -> command line."""
        found = {}
        for node in self.nodes:
            for pid in self.node_pids(node):
                cmdline = _cmdline(pid)
                if cmdline and not re.search(r"(^|/)(slurmd|sshd)( |$)", cmdline.split(" -")[0]):
                    found[pid] = cmdline
        return found

    def logs(self, tail: int = 40) -> str:
        parts = []
        for path in sorted((self.dir / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- tear-down -----------------------------------------------------------------------------------

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        t0 = time.monotonic()
        if any(p.poll() is None for name, p in self._daemons if name == "slurmctld"):
            _run(["scancel", "--full", "--user", "root"], env=self.env(), check=False, timeout=15)
            try:
                _wait(lambda: not self.leftover_processes(), 15, "")
            except TimeoutError:
                pass
        for _, proc in reversed(self._daemons):  # each daemon runs in a session of its own
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for _, proc in self._daemons:
            try:
                proc.wait(timeout=max(1.0, 10 - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        for node in self.nodes:  # anything still inside our namespaces (slurmstepd, job processes) is ours
            for pid in self.node_pids(node) if Path(f"/run/netns/{node.netns}").exists() else []:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for _, undo in reversed(self._undo):
            _run(undo, check=False)
        if self._made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)
        if not os.environ.get("DUPMAE_KEEP_CLUSTER_DIR"):
            shutil.rmtree(self.dir, ignore_errors=True)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _wait(predicate, timeout: float, what: str, details=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f} s\n{details()}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def local_cluster():
    """The running two-node cluster (started once per session, removed at its end); skips where this
    machine cannot host it."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = LocalCluster()
    try:
        cluster.start()
    except ClusterUnavailable as e:
        cluster.stop()
        pytest.skip(str(e))
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
