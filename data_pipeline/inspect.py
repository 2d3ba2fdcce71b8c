"""`dupmae inspect DIR`: what a prepared folder holds, and whether every byte is as written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .shards import Shard, ShardError, sha256_file


def load_manifest(directory: str | Path) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        hint = " (preparation unfinished: run the same dupmae prepare again to resume)" if (
            Path(directory) / "plan.json").is_file() else ""
        raise ShardError(f"{path}: missing{hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def verify_shards(directory: str | Path, manifest: dict) -> list[str]:
    """Every problem found, each naming its file; empty when all shards match the manifest."""
    directory = Path(directory)
    problems = []
    vocab_size = manifest["tokenizer"]["vocab_size"]
    for entry in manifest["shards"]:
        prefix = directory / entry["name"]
        for suffix, key in ((".bin", "bin_sha256"), (".idx", "idx_sha256")):
            path = prefix.with_suffix(suffix)
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif sha256_file(path) != entry[key]:
                problems.append(f"{path}: sha256 mismatch (corrupted or modified since preparation)")
        try:
            shard = Shard.open(prefix)
            shard.check_consistency()
            if len(shard) != entry["samples"] or shard.tokens.size != entry["tokens"]:
                problems.append(f"{prefix}.idx: {len(shard)} samples / {shard.tokens.size} tokens, "
                                f"manifest says {entry['samples']} / {entry['tokens']}")
            if shard.tokens.size and int(shard.tokens.max()) >= vocab_size:
                problems.append(f"{prefix}.bin: token id {int(shard.tokens.max())} >= vocab size {vocab_size}")
        except ShardError as e:
            problems.append(str(e))
    return problems


def _histogram(lengths: np.ndarray, max_len: int, bins: int = 8, width: int = 40) -> list[str]:
    edges = np.linspace(0, max_len - 2, bins + 1).astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(int(counts.max()), 1)
    return [f"  {lo:>5}-{hi:<5} {c:>10,}  {'#' * round(width * c / top)}"
            for lo, hi, c in zip(edges[:-1], edges[1:], counts)]


def inspect_shards(directory: str | Path, n_samples: int = 3, verify: bool = True, out=print) -> int:
    directory = Path(directory)
    manifest = load_manifest(directory)
    tok = manifest["tokenizer"]
    out(f"{directory}")
    out(f"  tokenizer   {tok['name']} (vocab {tok['vocab_size']}, hash {tok['vocab_hash'][:12]}), "
        f"{manifest['dtype']} ids, max_len {manifest['max_len']}")
    out(f"  documents   {manifest['documents']:,}   samples {manifest['samples']:,}   "
        f"tokens {manifest['tokens']:,}   shards {len(manifest['shards'])}")
    bad = manifest["bad_records"]
    if bad["count"]:
        out(f"  skipped     {bad['count']:,} bad record(s): "
            + ", ".join(f"{n} {k}" for k, n in sorted(bad["by_kind"].items())))
        for line in bad["first"][:3]:
            out(f"              {line}")

    problems = verify_shards(directory, manifest) if verify else []
    readable = []
    for entry in manifest["shards"]:
        try:
            readable.append(Shard.open(directory / entry["name"]))
        except ShardError:
            pass
    if readable:
        lengths = np.concatenate([np.asarray(s.lengths) for s in readable])
        if lengths.size:
            out(f"  lengths     mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, max {lengths.max()} "
                f"(+2 for [CLS]/[SEP]); samples per document {lengths.size / max(manifest['documents'], 1):.2f}")
            out("  length histogram (tokens per sample)")
            for line in _histogram(lengths, manifest["max_len"]):
                out(line)
        if n_samples and (directory / "tokenizer").is_dir():
            from .tokenizer import load_fast_tokenizer

            tokenizer = load_fast_tokenizer(str(directory / "tokenizer"))
            rng = np.random.default_rng(0)
            total = sum(len(s) for s in readable)
            out(f"  {min(n_samples, total)} sample(s)")
            for gid in sorted(rng.choice(total, size=min(n_samples, total), replace=False)):
                shard_i, local = _locate(readable, int(gid))
                ids = np.asarray(readable[shard_i][local], dtype=np.int64)
                text = tokenizer.decode(ids)
                out(f"  [{gid}] {len(ids)} tokens: {text[:300]}{'...' if len(text) > 300 else ''}")
    if verify:
        if problems:
            out(f"  VERIFY FAILED: {len(problems)} problem(s)")
            for p in problems:
                out(f"    {p}")
            return 1
        out(f"  verified    sha256 and structure of {2 * len(manifest['shards'])} file(s): OK")
    return 0


def _locate(shards: list[Shard], gid: int) -> tuple[int, int]:
    for i, s in enumerate(shards):
        if gid < len(s):
            return i, gid
        gid -= len(s)
    raise IndexError(gid)
