"""Input discovery and record streams for `dupmae prepare`.

A *record* is one jsonl line, one text line or blank-line-separated block, one parquet row, or one row of
a local Hugging Face `datasets` folder. Records are numbered in input order (files sorted by path, as
given); shard k of a preparation holds records [k * R, (k + 1) * R). That numbering is what makes
preparation resumable: finished shards are skipped by counting records, without tokenizing them.

Readers stay cheap: jsonl and text records travel to the tokenizer workers as raw bytes, and are decoded
and parsed there, so the reading process only does I/O.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

FORMATS = ("jsonl", "text", "parquet", "hf")
_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "text", ".text": "text",
             ".parquet": "parquet"}


class InputError(ValueError):
    pass


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str
    size: int
    mtime_ns: int

    def fingerprint(self) -> dict:
        return {"path": self.path, "format": self.format, "size": self.size, "mtime_ns": self.mtime_ns}


def _is_hf_folder(p: Path) -> bool:
    return p.is_dir() and any((p / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def detect_format(path: Path, forced: str | None) -> str:
    if forced and forced != "auto":
        if forced not in FORMATS:
            raise InputError(f"unknown input format {forced!r}; choose one of {', '.join(FORMATS)}")
        return forced
    if _is_hf_folder(path):
        return "hf"
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = _SUFFIXES.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise InputError(f"{path}: cannot tell the format from the name; pass --format jsonl|text|parquet|hf")
    return fmt


def expand_inputs(patterns: list[str], forced_format: str | None = None) -> list[InputFile]:
    """Files, globs and dataset folders -> a sorted, de-duplicated list; every pattern must match."""
    found: dict[str, InputFile] = {}
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise InputError(f"input {pattern!r} matches no file")
        for m in matches:
            p = Path(m).resolve()
            if p.is_dir() and not _is_hf_folder(p):
                raise InputError(f"{p} is a folder but not a saved Hugging Face dataset; give files or a glob")
            fmt = detect_format(p, forced_format)
            st = p.stat()
            size = st.st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            found[str(p)] = InputFile(str(p), fmt, size, st.st_mtime_ns)
    return [found[k] for k in sorted(found)]


@dataclass
class Record:
    """One record on its way to a worker. `payload` is raw bytes (jsonl/text) or a dict of fields."""

    file_index: int
    line: int  # 1-based line (jsonl/text) or 0-based row (parquet/hf)
    payload: bytes | dict


@dataclass
class FieldSpec:
    text_field: str = "text"
    title_field: str | None = "title"
    text_mode: str = "line"  # text files: "line" = a document per line, "block" = per blank-line block
    columns: list[str] = field(default_factory=list)


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _raw_position(f) -> int:
    raw = getattr(f, "fileobj", None)  # gzip: report compressed bytes, as the file size is compressed
    return (raw or f).tell()


def _iter_lines(path: str, skip_blank: bool) -> Iterator[tuple[int, bytes, int]]:
    with _open_binary(path) as f:
        last = 0
        for n, line in enumerate(f, 1):
            pos = _raw_position(f)
            delta, last = pos - last, pos
            stripped = line.rstrip(b"\r\n")
            if skip_blank and not stripped.strip():
                yield n, b"", delta  # counted, so blank lines keep numbering and byte progress exact
                continue
            yield n, stripped, delta


def _iter_blocks(path: str) -> Iterator[tuple[int, bytes, int]]:
    block: list[bytes] = []
    start, pending = 0, 0
    for n, line, delta in _iter_lines(path, skip_blank=False):
        pending += delta
        if line.strip():
            if not block:
                start = n
            block.append(line)
        elif block:
            yield start, b"\n".join(block), pending
            block, pending = [], 0
    if block:  # trailing blank lines are no record (their bytes are simply not reported as progress)
        yield start, b"\n".join(block), pending


def _iter_table(batches, n_rows: int, size: int, spec: FieldSpec) -> Iterator[tuple[int, dict, int]]:
    per_row = size / max(n_rows, 1)
    done, row = 0.0, 0
    for batch in batches:
        cols = {name: batch.column(name).to_pylist() if name in batch.schema.names else None for name in spec.columns}
        for i in range(batch.num_rows):
            before = int(done)
            done += per_row
            yield row, {k: (v[i] if v is not None else _MISSING) for k, v in cols.items()}, int(done) - before
            row += 1


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _parquet_rows(path: str, size: int, spec: FieldSpec):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    present = [c for c in spec.columns if c in pf.schema_arrow.names]
    if spec.text_field not in pf.schema_arrow.names:
        raise InputError(f"{path}: no column {spec.text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                         "set --text-field")
    return _iter_table(pf.iter_batches(batch_size=1024, columns=present), pf.metadata.num_rows, size, spec)


def _hf_rows(path: str, size: int, spec: FieldSpec):
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(path)
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise InputError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    if spec.text_field not in ds.column_names:
        raise InputError(f"{path}: no column {spec.text_field!r} (columns: {', '.join(ds.column_names)}); "
                         "set --text-field")
    present = [c for c in spec.columns if c in ds.column_names]
    table = ds.with_format("arrow").select_columns(present)
    # a slice of an Arrow table may span several record batches: yield every one of them
    batches = (rb for i in range(0, len(table), 1024) for rb in table[i : i + 1024].to_batches())
    return _iter_table(batches, len(table), size, spec)


def iter_records(files: list[InputFile], spec: FieldSpec) -> Iterator[tuple[Record, int]]:
    """(record, bytes of input it advanced) for every record of every file, in order."""
    for fi, f in enumerate(files):
        if f.format == "jsonl":
            it = _iter_lines(f.path, skip_blank=True)
        elif f.format == "text":
            it = _iter_lines(f.path, skip_blank=True) if spec.text_mode == "line" else _iter_blocks(f.path)
        elif f.format == "parquet":
            it = _parquet_rows(f.path, f.size, spec)
        else:
            it = _hf_rows(f.path, f.size, spec)
        for line, payload, delta in it:
            yield Record(fi, line, payload), delta


class BadRecord(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def record_text(fmt: str, payload: bytes | dict, spec: FieldSpec) -> str:
    """The document text of one record, or BadRecord naming what is wrong with it."""
    if fmt == "text":
        if not payload:
            raise BadRecord("empty document", "blank")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord("invalid utf-8", f"byte {e.start}: {e.reason}") from None
    else:
        if fmt == "jsonl":
            if not payload:
                raise BadRecord("empty document", "blank line")
            try:
                obj = json.loads(payload.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise BadRecord("invalid utf-8", f"byte {e.start}: {e.reason}") from None
            except json.JSONDecodeError as e:
                raise BadRecord("malformed json", f"{e.msg} at column {e.colno}") from None
            if not isinstance(obj, dict):
                raise BadRecord("malformed json", f"a JSON {type(obj).__name__}, not an object")
        else:
            obj = payload
        body = obj.get(spec.text_field, _MISSING)
        if body is _MISSING:
            raise BadRecord("missing field", f"no {spec.text_field!r} field")
        if body is None:
            body = ""
        if not isinstance(body, str):
            raise BadRecord("missing field", f"field {spec.text_field!r} is a {type(body).__name__}, not a string")
        title = obj.get(spec.title_field) if spec.title_field else None
        text = f"{title.strip()} {body}" if isinstance(title, str) and title.strip() else body
    if not text.strip():
        raise BadRecord("empty document", "no text")
    return text
