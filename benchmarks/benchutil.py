"""Shared by the benchmark scripts: the benchmark texts (built outside the repo, cached), machine/commit
stamps, CSV rows and tables. Standard library only: `dupmae prepare` spawns worker processes that import the
calling script again, so nothing heavy may be imported here at module level."""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CACHE = Path(os.environ.get("DUPMAE_BENCH_CACHE", Path(tempfile.gettempdir()) / "dupmae-bench-cache"))
WORDNET = REPO / "data" / "wordnet" / "corpus.jsonl"
PYDOC_PACKAGE = "python3.11-doc"
LONG_DOCS_COPIES = 4  # 6.2 MB of sections per copy of the Python docs -> about 25 MB
WORDNET_COPIES = 5  # 4.8 MB per copy -> 24 MB


def machine() -> str:
    """Host name and core count, and the GPU where one is used (rows from a GPU and from the CPU differ)."""
    name = f"{platform.node()} {os.cpu_count()}cpu"
    try:
        import torch

        if torch.cuda.is_available():
            name += f", {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    return name


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def wait_for_idle(max_wait_s: float, busy_pct: float = 10.0) -> float:
    """Wait until the other processes on this machine leave it idle (system-wide CPU below `busy_pct` for 3 s
    in a row), at most `max_wait_s`. Returns the last busy percentage seen (high: the run will be disturbed)."""
    import psutil

    quiet, busy, start = 0, 100.0, time.monotonic()
    while time.monotonic() - start < max_wait_s:
        busy = psutil.cpu_percent(interval=1.0)
        quiet = quiet + 1 if busy < busy_pct else 0
        if quiet >= 3:
            break
    return busy


def busy_cpu_seconds() -> float:
    """CPU seconds all processes of the machine have used so far (for what OTHER processes used during a run)."""
    import psutil

    t = psutil.cpu_times()
    return sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))


def own_cpu_seconds() -> float:
    """CPU seconds this process has used (user + system)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def today() -> str:
    return datetime.date.today().isoformat()


def append_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def replace_rows(path: Path, columns: list[str], rows: list[dict], key: tuple[str, ...]) -> None:
    """Write `rows` into the CSV at `path`, replacing the earlier rows with the same `key` columns (where the first
    of them was, so the file keeps its order) instead of appending a second copy; other rows stay as they are."""
    import csv

    def k(row):
        return tuple(str(row.get(c, "")) for c in key)

    old = []
    if path.is_file() and path.stat().st_size:
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
    new = {k(r): r for r in rows}
    out, placed = [], set()
    for row in old:
        if k(row) in new:
            if k(row) not in placed:
                out.append(new[k(row)])
                placed.add(k(row))
        else:
            out.append(row)
    for row in rows:  # keys the file did not have yet, in the order given
        if k(row) not in placed:
            out.append(row)
            placed.add(k(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(out)
    tmp.replace(path)


def last_rows(path: Path, key: tuple[str, ...]) -> dict[tuple, dict]:
    """The last row of the CSV at `path` for each value of the `key` columns ({} when there is no file)."""
    import csv

    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {tuple(r.get(c, "") for c in key): r for r in csv.DictReader(f)}


def print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths)))


def _numeric(v: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?x?%?", v))


def document_text(obj: dict, text_field: str = "text", title_field: str | None = "title") -> str:
    """The text `dupmae prepare` tokenizes for one jsonl object (readers.record_text: title + " " + text)."""
    body = obj.get(text_field) or ""
    title = obj.get(title_field) if title_field else None
    return f"{title.strip()} {body}" if isinstance(title, str) and title.strip() else body


def read_texts(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(document_text(json.loads(line)))
    return texts


# ----------------------------------------------------------------------------------------------------------
# "long documents": the sections of the Python 3.11 documentation (Debian python3.11-doc, reStructuredText
# sources), prose only, one document per section.

_UNDERLINE = re.compile(r"^([=\-~^*#+\"'`.:_])\1{2,}\s*$")
_ROLE = re.compile(r":[\w:.+-]+:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`")
_SKIP_DIRECTIVES = ("code-block", "sourcecode", "literalinclude", "productionlist", "highlight", "index::",
                    "toctree", "doctest", "testcode", "testsetup", "testoutput", "csv-table", "_")


def _pydoc_sources() -> Path:
    """Extract python3.11-doc into the cache (apt-get download, else apt's package cache)."""
    root = CACHE / "python3.11-doc"
    sources = root / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
    if sources.is_dir():
        return sources
    CACHE.mkdir(parents=True, exist_ok=True)
    debs = sorted((CACHE).glob(f"{PYDOC_PACKAGE}_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", PYDOC_PACKAGE], cwd=CACHE, capture_output=True)
        debs = sorted(CACHE.glob(f"{PYDOC_PACKAGE}_*.deb")) or sorted(
            Path("/var/cache/apt/archives").glob(f"{PYDOC_PACKAGE}_*.deb"))
    if not debs:
        raise SystemExit(f"cannot get the Debian package {PYDOC_PACKAGE} (apt-get download failed and it is not "
                         "in /var/cache/apt/archives); pass --text FILE.jsonl")
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], check=True)
    os.replace(tmp, root)
    return sources


def _rst_sections(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    docs: list[str] = []
    section: list[str] = []
    para: list[str] = []
    literal_next = False

    def flush_paragraph() -> None:
        nonlocal literal_next
        if not para:
            return
        block = para[:]
        para.clear()
        if literal_next and block[0][:1] in " \t":
            return  # the literal (code) block after a "::" paragraph
        literal_next = block[-1].rstrip().endswith("::")
        first = block[0].strip()
        if first.startswith(".."):
            if any(d in first for d in _SKIP_DIRECTIVES):
                literal_next = any(k in first for k in ("code", "doctest", "testcode", "testoutput"))
                return
            block = block[1:]  # a directive (function, note, ...): keep its prose body
        if any(line.strip().startswith((">>>", "$ ", "+--", "|")) for line in block):
            return
        text = " ".join(line.strip() for line in block)
        text = _ROLE.sub(r"\1", text)
        for a, b in (("``", ""), ("**", ""), ("`_", ""), ("`", ""), ("::", ":")):
            text = text.replace(a, b)
        if len(text.split()) >= 4:
            section.append(text)

    def flush_section() -> None:
        flush_paragraph()
        text = " ".join(section)
        if len(text.split()) >= 30:
            docs.append(text)
        section.clear()

    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if _UNDERLINE.match(line):
            continue
        if line.strip() and line[:1] not in " \t" and _UNDERLINE.match(nxt) and len(nxt.strip()) >= len(line.strip()):
            flush_section()  # a heading starts a new document
            continue
        if not line.strip():
            flush_paragraph()
            continue
        para.append(line)
    flush_section()
    return docs


def long_docs_text() -> Path:
    """~25 MB jsonl of Python-documentation sections (median ~145 words; LONG_DOCS_COPIES copies of the 3,763
    sections, so every run is several seconds long). Built once into the cache."""
    out = CACHE / f"pydoc-sections-x{LONG_DOCS_COPIES}.jsonl"
    if out.is_file():
        return out
    docs = [d for f in sorted(_pydoc_sources().rglob("*.txt")) for d in _rst_sections(f)]
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for _ in range(LONG_DOCS_COPIES):
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return out


def wordnet_text() -> Path:
    """The repo's WordNet corpus (38,488 glosses, title + text) repeated WORDNET_COPIES times, in the cache."""
    out = CACHE / f"wordnet-x{WORDNET_COPIES}.jsonl"
    if out.is_file():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    data = WORDNET.read_bytes()
    if not data.endswith(b"\n"):
        data += b"\n"
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data * WORDNET_COPIES)
    os.replace(tmp, out)
    return out


def paired_permutation_p(a, b, n: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of a sign-flip permutation test on paired per-query differences a - b."""
    import numpy as np

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    observed = abs(d.mean())
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n, len(d)))
    return float(((np.abs((signs * d).mean(1)) >= observed - 1e-15).sum() + 1) / (n + 1))
