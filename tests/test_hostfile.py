"""Hostfiles: parsing, every error a user can make (with the line it is on), the --include/--exclude and
--nodes/--gpus-per-node selection (checked against DeepSpeed's own resolver), hostfiles from Slurm."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from dupmae.cluster.hostfile import (HostfileError, format_hostfile, hostfile_from_slurm, parse_hostfile,
                                     read_hostfile, select, slurm_node_addr, slurm_slots_per_node)

EXAMPLES = Path(__file__).resolve().parents[1] / "cluster" / "examples"


def test_hosts_slots_comments_and_order():
    text = "# the rack\n\nworker-b slots=8   # trailing comment\n  worker-a  slots=4\n10.0.0.7 slots=1\n"
    hosts = parse_hostfile(text)
    assert list(hosts.items()) == [("worker-b", 8), ("worker-a", 4), ("10.0.0.7", 1)]
    assert parse_hostfile(format_hostfile(hosts)) == hosts


@pytest.mark.parametrize("text, message", [
    ("node1\n", "line 1: 'node1' has no slot count: write 'node1 slots=N'"),
    ("node1 slots=0\n", "bad slot count '0' for node1: slots must be a whole number >= 1"),
    ("node1 slots=-2\n", "bad slot count '-2'"),
    ("node1 slots=eight\n", "bad slot count 'eight'"),
    ("node1 slots=1.5\n", "bad slot count '1.5'"),
    ("node1 slots=\n", "bad slot count ''"),
    ("node1 max_slots=4\n", "expected 'node1 slots=N', got 'node1 max_slots=4'"),
    ("node1 slots=2 extra\n", "bad slot count '2 extra'"),
    ("a slots=1\nb slots=1\n\na slots=2\n", "line 4: host a is listed twice (first on line 1)"),
    ("node1;reboot slots=1\n", "host name 'node1;reboot' contains ';'"),
    ("$(reboot) slots=1\n", "contains '$' '(' ')'"),
    ("`id` slots=1\n", "contains '`'"),
    ("root@node1 slots=1\n", "contains '@'"),
    ("node1:22 slots=1\n", "contains ':'"),
    ("-node slots=1\n", "must start and end with a letter or a digit"),
    ("# only a comment\n\n", "no hosts"),
    ("", "no hosts"),
])
def test_errors_name_the_line_and_the_fix(text, message):
    with pytest.raises(HostfileError) as e:
        parse_hostfile(text, "hosts.txt")
    assert message in str(e.value)
    assert str(e.value).startswith("hosts.txt")


def test_missing_file(tmp_path):
    with pytest.raises(HostfileError, match="not found"):
        read_hostfile(tmp_path / "nope")


POOL = {"a": 4, "b": 4, "c": 2}


@pytest.mark.parametrize("include, exclude", [
    ("b", ""), ("a@c", ""), ("b:1,3", ""), ("a:0@c:1", ""), ("c@a", ""),
    ("", "b"), ("", "a:0,1"), ("", "a@c:1"),
])
def test_filters_resolve_as_deepspeed_does(include, exclude):
    from deepspeed.launcher.runner import parse_inclusion_exclusion

    ours = select(POOL, include, exclude)
    theirs = parse_inclusion_exclusion(dict(POOL), include, exclude)
    assert list(ours.items()) == [(h, list(s)) for h, s in theirs.items()]


def test_nodes_and_slots_per_node():
    assert list(select(POOL, nodes=2).items()) == [("a", [0, 1, 2, 3]), ("b", [0, 1, 2, 3])]
    assert list(select(POOL, slots_per_node=2).items()) == [("a", [0, 1]), ("b", [0, 1]), ("c", [0, 1])]


@pytest.mark.parametrize("kwargs, message", [
    ({"include": "a", "exclude": "b"}, "cannot be combined"),
    ({"include": "a", "nodes": 1}, "cannot be combined with --nodes"),
    ({"include": "zz"}, "host zz is not in the hostfile (hosts: a, b, c)"),
    ({"include": "c:2"}, "c has slots 0..1, not 2"),
    ({"include": "a:x"}, "bad slot 'x'"),
    ({"include": "a@@b"}, "empty host name"),
    ({"include": "a;b"}, "contains ';'"),
    ({"exclude": "a@b@c"}, "no slots left"),
    ({"nodes": 4}, "--nodes 4: the hostfile lists only 3 host(s)"),
    ({"slots_per_node": 3}, "--gpus-per-node 3: more than the hostfile gives c (slots=2)"),
])
def test_selection_errors(kwargs, message):
    with pytest.raises(HostfileError) as e:
        select(POOL, **kwargs)
    assert message in str(e.value)


def test_example_hostfiles():
    assert read_hostfile(EXAMPLES / "hostfile-1x8") == {"node001": 8}
    four = read_hostfile(EXAMPLES / "hostfile-4x8")
    assert list(four) == ["node001", "node002", "node003", "node004"] and set(four.values()) == {8}


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """An `scontrol` on PATH answering `show hostnames` and `show node` like Slurm's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text('#!/bin/sh\n'
                      'if [ "$1 $2" = "show hostnames" ]; then printf "gpu017\\ngpu018\\ngpu020\\n"; exit 0; fi\n'
                      'if [ "$1 $2" = "show node" ]; then echo "NodeName=$3 Arch=x86_64 CoresPerSocket=32"; '
                      'echo "   NodeAddr=10.1.0.$(echo $3 | tr -dc 0-9 | tail -c 2) NodeHostName=$3 Version=22.05"; exit 0; fi\n'
                      'echo "scontrol: unknown $*" >&2; exit 1\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return script


def test_hostfile_from_slurm(fake_scontrol):
    hosts = hostfile_from_slurm(8, "gpu[017-018,020]")
    assert format_hostfile(hosts) == "gpu017 slots=8\ngpu018 slots=8\ngpu020 slots=8\n"
    assert slurm_node_addr("gpu018") == "10.1.0.18"
    assert slurm_slots_per_node({"SLURM_GPUS_ON_NODE": "4"}) == 4
    assert slurm_slots_per_node({"SLURM_GPUS_PER_NODE": "h100:8"}) == 8
    assert slurm_slots_per_node({}) is None


def test_slurm_outside_an_allocation(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    with pytest.raises(HostfileError, match="run inside an allocation"):
        hostfile_from_slurm(8)
