"""`dupmae prepare`: raw text -> packed, pre-tokenized shards + manifest.json.

Output folder:
    plan.json             what this folder is being made from (tokenizer, max_len, inputs, settings);
                          a run with anything different is refused, so shards are never mixed
    shard-00000.bin/.idx  packed samples (format in shards.py)
    shard-00000.json      the shard's counts, checksums and bad records; written LAST, so its presence
                          means the shard is complete (resume skips it without tokenizing)
    tokenizer/            a copy of the tokenizer, so the folder is self-contained
    manifest.json         totals, per-file sha256, the arguments used; written when every shard is done

Shard k holds input records [k * docs_per_shard, (k + 1) * docs_per_shard), so the result does not depend
on worker count or on where a previous run was interrupted.
"""
from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from .packing import ChunkResult, Packer, worker_init, worker_run
from .readers import FieldSpec, InputError, InputFile, expand_inputs, iter_records
from .shards import sha256_file, token_dtype, write_shard
from .tokenizer import DEFAULT_TOKENIZER, load_fast_tokenizer, resolve_tokenizer_path, tokenizer_info

FORMAT = "dupmae-shards"
FORMAT_VERSION = 1
MAX_REPORTED = 10


class PrepareError(RuntimeError):
    pass


@dataclass
class PrepareConfig:
    inputs: list[str]
    out_dir: str
    tokenizer: str = DEFAULT_TOKENIZER
    max_len: int = 512
    docs_per_shard: int = 50_000
    workers: int = 0  # 0: one per core
    strict: bool = False
    format: str = "auto"
    text_field: str = "text"
    title_field: str | None = "title"
    text_mode: str = "line"
    chunk_records: int = 256
    overwrite: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not 8 <= self.max_len <= 32768:
            raise PrepareError(f"--max-len must be in [8, 32768], got {self.max_len}")
        if self.docs_per_shard < 1:
            raise PrepareError(f"--docs-per-shard must be positive, got {self.docs_per_shard}")
        if self.chunk_records < 1:
            raise PrepareError(f"--chunk-records must be positive, got {self.chunk_records}")
        if self.text_mode not in ("line", "block"):
            raise PrepareError(f"--text-mode must be line or block, got {self.text_mode!r}")
        if self.workers < 0:
            raise PrepareError(f"--workers must be >= 0, got {self.workers}")


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _our_files(out: Path) -> list[Path]:
    names = {"plan.json", "manifest.json", "tokenizer"}
    return [p for p in out.iterdir() if p.name in names or p.name.startswith("shard-")]


def _check_plan(out: Path, plan: dict, overwrite: bool) -> None:
    plan_path = out / "plan.json"
    if out.exists() and any(out.iterdir()) and not plan_path.is_file():
        stray = [p.name for p in out.iterdir()][:5]
        raise PrepareError(f"{out} is not empty and holds no plan.json ({', '.join(stray)}...): "
                           "refusing to write shards beside unknown files")
    if out.exists() and overwrite:
        stray = sorted(set(out.iterdir()) - set(_our_files(out)))
        if stray:
            raise PrepareError(f"--overwrite: {out} also holds files dupmae did not write "
                               f"({', '.join(p.name for p in stray[:5])}); nothing was removed")
        for p in _our_files(out):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        hint = "use another --out folder, or --overwrite to discard it"
        if old["tokenizer"]["vocab_hash"] != plan["tokenizer"]["vocab_hash"]:
            raise PrepareError(
                f"{out} was prepared with tokenizer {old['tokenizer']['name']!r} (vocab hash "
                f"{old['tokenizer']['vocab_hash'][:12]}), not {plan['tokenizer']['name']!r} "
                f"({plan['tokenizer']['vocab_hash'][:12]}); shards of two tokenizers are never mixed: {hint}")
        if old["max_len"] != plan["max_len"]:
            raise PrepareError(f"{out} was prepared with max_len {old['max_len']}, not {plan['max_len']}: {hint}")
        for key in ("inputs", "docs_per_shard", "fields"):
            if old[key] != plan[key]:
                raise PrepareError(f"{out} was prepared from different {key.replace('_', ' ')}: {hint}")
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(plan_path, plan)


class _Progress:
    def __init__(self, total_bytes: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare",
                        disable=not enabled, mininterval=1.0, dynamic_ncols=True, file=sys.stderr)
        self.start = time.perf_counter()
        self.docs = self.tokens = 0

    def advance(self, nbytes: int, docs: int = 0, tokens: int = 0) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bar.update(nbytes)
        dt = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt:,.0f} tokens/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


class _Pool:
    """Ordered, bounded parallel map: at most 2 chunks per worker in flight, so memory stays constant."""

    def __init__(self, workers: int, init_args: tuple):
        self.workers = workers
        if workers > 1:
            self.pool = mp.get_context("spawn").Pool(workers, initializer=worker_init, initargs=init_args)
        else:
            self.pool = None
            self.packer = Packer(*init_args)

    def map(self, jobs):
        if self.pool is None:
            for job in jobs:
                yield self.packer(*job)
            return
        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append(self.pool.apply_async(worker_run, (job,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _fmt_bad(files: list[InputFile], bad) -> str:
    fi, line, kind, detail = bad
    where = "row" if files[fi].format in ("parquet", "hf") else "line"
    return f"{files[fi].path}:{where} {line}: {kind}: {detail}"


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Run (or resume) a preparation; returns the manifest."""
    cfg.validate()
    out = Path(cfg.out_dir).expanduser().resolve()
    files = expand_inputs(cfg.inputs, cfg.format)
    spec = FieldSpec(cfg.text_field, cfg.title_field, cfg.text_mode,
                     columns=[c for c in (cfg.text_field, cfg.title_field) if c])
    tok_path = resolve_tokenizer_path(cfg.tokenizer)
    info = tokenizer_info(cfg.tokenizer)
    tok = load_fast_tokenizer(str(tok_path))
    dtype = np.dtype(token_dtype(info.vocab_size))
    max_tokens = cfg.max_len - 2
    plan = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": {**info.to_json(), "path": str(tok_path)},
        "max_len": cfg.max_len,
        "dtype": dtype.name,
        "docs_per_shard": cfg.docs_per_shard,
        "fields": {"text": cfg.text_field, "title": cfg.title_field, "text_mode": cfg.text_mode},
        "inputs": [f.fingerprint() for f in files],
    }
    _check_plan(out, plan, cfg.overwrite)
    if not (out / "tokenizer").is_dir():
        tmp = out / "tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(str(tmp))
        os.replace(tmp, out / "tokenizer")

    workers = cfg.workers or os.cpu_count() or 1
    log(f"[prepare] {len(files)} input file(s), {sum(f.size for f in files) / 1e6:,.1f} MB -> {out}")
    log(f"[prepare] tokenizer {info.name} (vocab {info.vocab_size}, {dtype.name} ids), max_len {cfg.max_len}, "
        f"{workers} worker(s)")
    formats = [f.format for f in files]
    init_args = (tok.backend_tokenizer.to_str(), max_tokens, dtype.name, formats, spec)
    progress = _Progress(sum(f.size for f in files), cfg.progress)
    records = iter_records(files, spec)
    pool = _Pool(workers, init_args)
    start = time.perf_counter()
    new_tokens = 0
    shard_metas = []
    reported = 0
    try:
        for k in range(sys.maxsize):
            meta_path = out / f"{_shard_name(k)}.json"
            if meta_path.is_file():
                meta = json.loads(meta_path.read_text())
                taken = sum(delta for _, delta in islice(records, meta["records"]))
                progress.advance(taken, meta["documents"], meta["tokens"])
                shard_metas.append(meta)
                continue
            bytes_taken = [0]

            def jobs():
                remaining = cfg.docs_per_shard
                chunk_id = 0
                while remaining:
                    batch = []
                    for rec, delta in islice(records, min(cfg.chunk_records, remaining)):
                        batch.append(rec)
                        bytes_taken[0] += delta
                    if not batch:
                        return
                    remaining -= len(batch)
                    yield chunk_id, batch
                    chunk_id += 1

            results: list[ChunkResult] = []
            for res in pool.map(jobs()):
                for b in res.bad:
                    if cfg.strict:
                        raise PrepareError(f"bad input (--strict): {_fmt_bad(files, b)}")
                    if reported < MAX_REPORTED:
                        log(f"[prepare] skipped {_fmt_bad(files, b)}")
                        reported += 1
                results.append(res)
                progress.advance(bytes_taken[0], len(res.blocks_per_doc), len(res.tokens))
                bytes_taken[0] = 0
            n_records = sum(r.records for r in results)
            if n_records == 0:
                break
            meta = _write_shard(out, k, results, dtype, files)
            new_tokens += meta["tokens"]
            shard_metas.append(meta)
            if n_records < cfg.docs_per_shard:
                break
    finally:
        progress.close()
        pool.close()

    manifest = _manifest(out, plan, shard_metas, files, cfg)
    if manifest["documents"] == 0:
        raise PrepareError(f"no usable document in {len(files)} input file(s); "
                           f"{manifest['bad_records']['count']} bad record(s): "
                           + "; ".join(manifest["bad_records"]["first"][:3]))
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file() or json.loads(manifest_path.read_text()) != manifest:
        _write_json_atomic(manifest_path, manifest)
    elapsed = time.perf_counter() - start
    _summary(manifest, elapsed, new_tokens, log)
    return manifest


def _write_shard(out: Path, k: int, results: list[ChunkResult], dtype, files: list[InputFile]) -> dict:
    name = _shard_name(k)
    tokens = np.concatenate([r.tokens for r in results]) if results else np.zeros(0, dtype)
    lengths = np.concatenate([r.lengths for r in results])
    per_doc = np.concatenate([r.blocks_per_doc for r in results])
    doc_index = np.zeros(len(per_doc) + 1, dtype=np.int64)
    np.cumsum(per_doc, out=doc_index[1:])
    write_shard(out / name, tokens, lengths, doc_index, dtype)
    bad = [b for r in results for b in r.bad]
    meta = {
        "name": name,
        "records": sum(r.records for r in results),
        "documents": int(len(per_doc)),
        "samples": int(len(lengths)),
        "tokens": int(tokens.size),
        "bin_sha256": sha256_file(out / f"{name}.bin"),
        "idx_sha256": sha256_file(out / f"{name}.idx"),
        "bad_records": {
            "count": len(bad),
            "by_kind": dict(collections.Counter(b[2] for b in bad)),
            "first": [_fmt_bad(files, b) for b in bad[:MAX_REPORTED]],
        },
    }
    _write_json_atomic(out / f"{name}.json", meta)
    return meta


def _manifest(out: Path, plan: dict, metas: list[dict], files: list[InputFile], cfg: PrepareConfig) -> dict:
    by_kind: collections.Counter = collections.Counter()
    first: list[str] = []
    for m in metas:
        by_kind.update(m["bad_records"]["by_kind"])
        first.extend(m["bad_records"]["first"])
    args = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "extra", "overwrite")}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": plan["tokenizer"],
        "max_len": plan["max_len"],
        "dtype": plan["dtype"],
        "records": sum(m["records"] for m in metas),
        "documents": sum(m["documents"] for m in metas),
        "samples": sum(m["samples"] for m in metas),
        "tokens": sum(m["tokens"] for m in metas),
        "bad_records": {"count": sum(by_kind.values()), "by_kind": dict(by_kind), "first": first[:MAX_REPORTED]},
        "shards": [{k: m[k] for k in ("name", "records", "documents", "samples", "tokens", "bin_sha256",
                                      "idx_sha256")} for m in metas],
        "inputs": plan["inputs"],
        "args": args,
    }


def _summary(manifest: dict, elapsed: float, new_tokens: int, log) -> None:
    bad = manifest["bad_records"]
    log(f"[prepare] done: {manifest['documents']:,} documents -> {manifest['samples']:,} samples, "
        f"{manifest['tokens']:,} tokens in {len(manifest['shards'])} shard(s)")
    if new_tokens:
        log(f"[prepare] tokenized {new_tokens:,} tokens in {elapsed:.1f} s ({new_tokens / max(elapsed, 1e-9):,.0f} tokens/s)")
    else:
        log("[prepare] every shard was already complete: nothing to do")
    if bad["count"]:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(bad["by_kind"].items()))
        log(f"[prepare] skipped {bad['count']} bad record(s): {kinds}")
        for line in bad["first"][:5]:
            log(f"[prepare]   {line}")


__all__ = ["PrepareConfig", "PrepareError", "prepare", "InputError"]
