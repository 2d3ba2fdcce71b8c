"""Hostfiles: the MPI-style `HOST slots=N` lists the deepspeed launcher reads, checked before a launch.

    node001 slots=8        # a comment may follow
    node002 slots=8

DeepSpeed's own parser stops at the first bad line with a generic message, accepts host names that its
pdsh/ssh command lines then hand to a remote shell, and applies `--include/--exclude` only after it has
started ssh. Here every problem is an error naming the file, the line and what to write instead, before
anything runs: a missing or bad slot count, a duplicate host, a name with shell metacharacters. The
filters use DeepSpeed's syntax (`NAME[:SLOT[,SLOT...]][@NAME...]`) and resolve to the same hosts and slots
DeepSpeed will pick, so the launcher and these checks agree.
"""
from __future__ import annotations

import os
import re
import subprocess
from collections import OrderedDict
from pathlib import Path

# a DNS name or an IPv4 address; nothing a shell, pdsh (`,` lists) or DeepSpeed's filters (`@`, `:`) would read
HOST_NAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$")
_LINE = re.compile(r"^(?P<host>\S+)(?:\s+(?P<rest>.*))?$")


class HostfileError(ValueError):
    """A hostfile, a filter or a Slurm allocation that cannot be launched on."""


def check_host_name(name: str, where: str) -> None:
    if HOST_NAME.match(name):
        return
    bad = sorted({c for c in name if not re.match(r"[A-Za-z0-9._-]", c)})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise HostfileError(f"{where}: host name {name!r} contains {shown}: a host name is letters, digits, "
                            "'.', '-' and '_' only (pdsh and ssh pass it to a shell)")
    raise HostfileError(f"{where}: host name {name!r} must start and end with a letter or a digit")


def parse_hostfile(text: str, source: str = "hostfile") -> OrderedDict[str, int]:
    """{host: slots} in file order. Blank lines and `#` comments (whole-line or trailing) are ignored."""
    hosts: OrderedDict[str, int] = OrderedDict()
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {number}"
        m = _LINE.match(line)
        host, rest = m.group("host"), (m.group("rest") or "").strip()
        check_host_name(host, where)
        if not rest:
            raise HostfileError(f"{where}: {line!r} has no slot count: write '{host} slots=N' "
                                "(N = GPUs, i.e. ranks, on that host)")
        if not rest.startswith("slots="):
            raise HostfileError(f"{where}: expected '{host} slots=N', got {line!r}")
        value = rest[len("slots="):]
        if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
            raise HostfileError(f"{where}: bad slot count {value!r} for {host}: slots must be a whole number >= 1")
        if host in hosts:
            raise HostfileError(f"{where}: host {host} is listed twice (first on line {first_line[host]}); "
                                "give each host one line with its total slots")
        hosts[host] = int(value)
        first_line[host] = number
    if not hosts:
        raise HostfileError(f"{source}: no hosts (expected lines like 'node001 slots=8')")
    return hosts


def read_hostfile(path: str | Path) -> OrderedDict[str, int]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HostfileError(f"hostfile {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HostfileError(f"hostfile {path} cannot be read: {e}") from None
    return parse_hostfile(text, str(path))


def format_hostfile(hosts: dict[str, int]) -> str:
    return "".join(f"{host} slots={slots}\n" for host, slots in hosts.items())


def _parse_filter(spec: str, flag: str, hosts: dict[str, int]) -> OrderedDict[str, list[int]]:
    """`NAME[:SLOT[,SLOT...]]@...` -> {host: slots named, or [] for the whole host}, checked against `hosts`."""
    chosen: OrderedDict[str, list[int]] = OrderedDict()
    for part in spec.split("@"):
        name, _, slots_text = part.partition(":")
        if not name:
            raise HostfileError(f"{flag} {spec!r}: empty host name (format: NAME[:SLOT[,SLOT...]][@NAME...])")
        check_host_name(name, flag)
        if name not in hosts:
            raise HostfileError(f"{flag}: host {name} is not in the hostfile (hosts: {', '.join(hosts)})")
        slots = []
        if slots_text:
            for s in slots_text.split(","):
                if not s.isdigit():
                    raise HostfileError(f"{flag} {spec!r}: bad slot {s!r} (slots are numbers, e.g. {name}:0,1)")
                if int(s) >= hosts[name]:
                    raise HostfileError(f"{flag}: {name} has slots 0..{hosts[name] - 1}, not {s}")
                slots.append(int(s))
        chosen[name] = sorted(set(chosen.get(name, [])) | set(slots))  # [] = the whole host
    return chosen


def select(hosts: dict[str, int], include: str = "", exclude: str = "", nodes: int = 0,
           slots_per_node: int = 0) -> OrderedDict[str, list[int]]:
    """The hosts and slot ids a launch uses, as DeepSpeed resolves `--include/--exclude` and
    `--num_nodes/--num_gpus`: file order kept; filters and counts are mutually exclusive."""
    if include and exclude:
        raise HostfileError("--include and --exclude cannot be combined")
    if (include or exclude) and (nodes or slots_per_node):
        raise HostfileError("--include/--exclude cannot be combined with --nodes/--gpus-per-node "
                            "(the deepspeed launcher refuses it)")
    active: OrderedDict[str, list[int]] = OrderedDict((h, list(range(n))) for h, n in hosts.items())
    if include:
        wanted = _parse_filter(include, "--include", hosts)
        active = OrderedDict((h, wanted[h] or active[h]) for h in active if h in wanted)
    elif exclude:
        dropped = _parse_filter(exclude, "--exclude", hosts)
        for h, slots in dropped.items():
            active[h] = [] if not slots else [s for s in active[h] if s not in slots]
        active = OrderedDict((h, s) for h, s in active.items() if s)
    if nodes:
        if nodes > len(active):
            raise HostfileError(f"--nodes {nodes}: the hostfile lists only {len(active)} host(s)")
        active = OrderedDict(list(active.items())[:nodes])
    if slots_per_node:
        small = {h: len(s) for h, s in active.items() if len(s) < slots_per_node}
        if small:
            raise HostfileError(f"--gpus-per-node {slots_per_node}: more than the hostfile gives "
                                + ", ".join(f"{h} (slots={n})" for h, n in small.items()))
        active = OrderedDict((h, list(range(slots_per_node))) for h in active)
    if not active:
        raise HostfileError("no slots left after --include/--exclude")
    return active


# -- Slurm ------------------------------------------------------------------------------------------

def _scontrol(*args: str) -> str:
    try:
        out = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise HostfileError("scontrol not found: --slurm needs the Slurm client commands on PATH") from None
    except subprocess.TimeoutExpired:
        raise HostfileError(f"scontrol {' '.join(args)} did not answer in 30 s (is slurmctld up?)") from None
    if out.returncode != 0:
        raise HostfileError(f"scontrol {' '.join(args)} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def slurm_nodes(nodelist: str | None = None) -> list[str]:
    """The allocation's host names, in order (`scontrol show hostnames $SLURM_JOB_NODELIST`)."""
    nodelist = nodelist or os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise HostfileError("--slurm: SLURM_JOB_NODELIST is not set; run inside an allocation (sbatch, salloc)")
    names = _scontrol("show", "hostnames", nodelist).split()
    for name in names:
        check_host_name(name, "Slurm node list")
    return names


def slurm_node_addr(name: str) -> str:
    """The address Slurm reaches node `name` at (NodeAddr; the name itself when Slurm has none)."""
    for token in _scontrol("show", "node", name).split():
        if token.startswith("NodeAddr="):
            return token.split("=", 1)[1] or name
    return name


def slurm_slots_per_node(env: dict | None = None) -> int | None:
    """GPUs per node Slurm gave this job, if it says: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE
    ('8' or 'a100:8')."""
    env = os.environ if env is None else env
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "").rsplit(":", 1)[-1]
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def hostfile_from_slurm(slots: int, nodelist: str | None = None) -> OrderedDict[str, int]:
    if slots < 1:
        raise HostfileError(f"slots per node must be >= 1, got {slots}")
    return OrderedDict((name, slots) for name in slurm_nodes(nodelist))
