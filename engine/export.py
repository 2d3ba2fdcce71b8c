"""`dupmae export`: (being written: issue 7)."""
from __future__ import annotations


class ExportError(Exception):
    """A user-facing export problem: exit code 2."""


def add_arguments(p) -> None:
    p.add_argument("source")
    p.add_argument("out_dir")


def run_from_args(args) -> int:
    raise ExportError("dupmae export is not available in this version")
