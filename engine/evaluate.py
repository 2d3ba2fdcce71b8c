"""`dupmae eval`: (being written: issue 7)."""
from __future__ import annotations


class EvalError(Exception):
    """A user-facing evaluation problem (bad BEIR files, missing model): exit code 2."""


def add_arguments(p) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)


def run_from_args(args) -> int:
    raise EvalError("dupmae eval is not available in this version")
