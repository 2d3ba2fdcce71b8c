"""`dupmae launch`: builds and runs the deepspeed launcher command (being written: issue 6)."""
from __future__ import annotations


class LaunchError(Exception):
    """A user-facing launch problem (bad hostfile, unreachable host, bad arguments): exit code 2."""


def add_arguments(p) -> None:
    p.add_argument("--config", "-c", required=True)


def run_from_args(args) -> int:
    raise LaunchError("dupmae launch is not available in this version")
