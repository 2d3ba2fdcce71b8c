"""Slurm batch scripts filled from a recipe (`dupmae launch ... --sbatch OUT`).

The two scripts in `cluster/slurm/` run as they are (`sbatch cluster/slurm/pretrain.sbatch CONFIG.toml`);
generating a copy only sets their `#SBATCH` lines (nodes, GPUs per node, partition, time, account, log
file, working directory) and makes the recipe and overrides its default arguments, so that
`sbatch job.sbatch` alone runs it. Nothing else in the script changes: what it does is readable in it.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent / "slurm"
TEMPLATES = {"per-node": "pretrain.sbatch", "slurm": "pretrain-dslauncher.sbatch"}
ARGUMENTS_MARKER = "# DUPMAE-DEFAULT-ARGUMENTS"
_VALUE = re.compile(r"^[A-Za-z0-9_.:,@%/+=-]+$")


class SbatchError(ValueError):
    pass


@dataclass
class BatchSettings:
    nodes: int
    gpus_per_node: int = 0  # 0: no GPU request (CPU nodes); the script then runs one rank per node
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str = "dupmae"
    output: str | None = None  # the job's log; %j is the job id
    chdir: str | None = None  # where the job runs: relative paths in the recipe are relative to it

    def directives(self) -> dict[str, str | None]:
        return {"job-name": self.job_name, "nodes": str(self.nodes),
                "gpus-per-node": str(self.gpus_per_node) if self.gpus_per_node else None,
                "partition": self.partition, "time": self.time, "account": self.account,
                "output": self.output, "chdir": self.chdir}


def template_path(variant: str) -> Path:
    path = TEMPLATE_DIR / TEMPLATES[variant]
    if not path.is_file():
        raise SbatchError(f"{path} not found: batch scripts are generated from a source checkout of dupmae "
                          "(or copy cluster/slurm/ from one)")
    return path


def render(template: str, settings: BatchSettings, arguments: list[str], venv: str | None = None,
           task: str = "pretrain") -> str:
    """`template` with its #SBATCH lines set from `settings` (a disabled `##SBATCH --key` line is enabled,
    a missing one added after the others) and `arguments` (recipe, overrides) as the default arguments."""
    if settings.nodes < 1:
        raise SbatchError(f"--nodes must be >= 1, got {settings.nodes}")
    lines = template.splitlines()
    if ARGUMENTS_MARKER not in lines:
        raise SbatchError(f"the template has no '{ARGUMENTS_MARKER}' line")
    for key, value in settings.directives().items():
        if value is None:
            continue
        if not _VALUE.match(value):
            raise SbatchError(f"--{key} {value!r}: only letters, digits and . : , @ % / + = - _ are allowed")
        line = f"#SBATCH --{key}={value}"
        existing = [i for i, text in enumerate(lines) if re.match(rf"^##?SBATCH --{re.escape(key)}(=|\s|$)", text)]
        if existing:
            lines[existing[0]] = line
        else:
            last = max(i for i, text in enumerate(lines) if text.startswith("#SBATCH"))
            lines.insert(last + 1, line)
    defaults = ["# the recipe this script was generated for, unless arguments are given to sbatch",
                "[[ $# -gt 0 ]] || set -- " + " ".join(shlex.quote(a) for a in arguments)]
    if venv:
        defaults.append(f"export DUPMAE_VENV=${{DUPMAE_VENV:-{shlex.quote(venv)}}}")
    if task != "pretrain":
        defaults.append(f"export DUPMAE_TASK=${{DUPMAE_TASK:-{shlex.quote(task)}}}")
    i = lines.index(ARGUMENTS_MARKER)
    lines[i:i + 1] = defaults
    return "\n".join(lines) + "\n"


def write_sbatch(out: str | Path, variant: str, settings: BatchSettings, arguments: list[str],
                 venv: str | None = None, task: str = "pretrain") -> Path:
    out = Path(out)
    text = render(template_path(variant).read_text(encoding="utf-8"), settings, arguments, venv, task)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    out.chmod(0o755)
    return out
