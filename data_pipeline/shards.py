"""Packed, pre-tokenized shards: `NAME.bin` (flat token ids) + `NAME.idx` (index), read zero-copy.

`.idx` layout (little-endian), after Megatron-LM's indexed dataset:

    offset  size  field
    0       8     magic  b"DMAEIDX\\0"
    8       4     format version (uint32, 1)
    12      4     dtype code (uint32: 2 = uint16, 4 = uint32 token ids in .bin)
    16      8     number of samples N (uint64)
    24      8     number of documents D (uint64)
    32      8     number of tokens T (uint64)
    40      4N    sample lengths (int32), then zero padding to a multiple of 8
    ..      8N    sample offsets into .bin, in tokens (int64)
    ..      8D+8  document boundaries (int64): document d holds samples [doc[d], doc[d+1])

Samples hold the document's tokens only; [CLS]/[SEP] are added by the collator.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"DMAEIDX\x00"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQQ")
DTYPE_CODES = {2: np.uint16, 4: np.uint32}


class ShardError(ValueError):
    """A shard that cannot be read as written: names the file and what is wrong."""


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def _pad8(n: int) -> int:
    return (-n) % 8


def write_shard(prefix: Path, tokens: np.ndarray, lengths: np.ndarray, doc_index: np.ndarray, dtype) -> None:
    """Write `prefix.bin` and `prefix.idx` atomically (temporary names, then rename; .idx last)."""
    prefix = Path(prefix)
    tokens = np.ascontiguousarray(tokens, dtype=dtype)
    lengths = np.ascontiguousarray(lengths, dtype=np.int32)
    doc_index = np.ascontiguousarray(doc_index, dtype=np.int64)
    if int(lengths.sum()) != tokens.size:
        raise ValueError("lengths do not add up to the token count")
    offsets = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    code = np.dtype(dtype).itemsize
    bin_tmp, idx_tmp = prefix.with_suffix(".bin.tmp"), prefix.with_suffix(".idx.tmp")
    with open(bin_tmp, "wb") as f:
        f.write(tokens.tobytes())
        f.flush()
        os.fsync(f.fileno())
    with open(idx_tmp, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, code, len(lengths), len(doc_index) - 1, tokens.size))
        f.write(lengths.tobytes())
        f.write(b"\x00" * _pad8(lengths.nbytes))
        f.write(offsets.tobytes())
        f.write(doc_index.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(bin_tmp, prefix.with_suffix(".bin"))
    os.replace(idx_tmp, prefix.with_suffix(".idx"))


@dataclass
class Shard:
    """One memmapped shard: `tokens`, `lengths`, `offsets`, `doc_index` are views, nothing is loaded."""

    prefix: Path
    tokens: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray
    doc_index: np.ndarray

    @classmethod
    def open(cls, prefix: str | os.PathLike) -> "Shard":
        prefix = Path(prefix)
        idx_path, bin_path = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise ShardError(f"{p}: missing")
        size = idx_path.stat().st_size
        if size < _HEADER.size:
            raise ShardError(f"{idx_path}: {size} bytes, shorter than the {_HEADER.size}-byte header")
        with open(idx_path, "rb") as f:
            magic, version, code, n, d, t = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise ShardError(f"{idx_path}: bad magic {magic!r}, not a DupMAE shard index")
        if version != VERSION:
            raise ShardError(f"{idx_path}: format version {version}, this reader knows {VERSION}")
        if code not in DTYPE_CODES:
            raise ShardError(f"{idx_path}: unknown token dtype code {code}")
        dtype = DTYPE_CODES[code]
        pad = _pad8(4 * n)
        expected = _HEADER.size + 4 * n + pad + 8 * n + 8 * (d + 1)
        if size != expected:
            raise ShardError(f"{idx_path}: {size} bytes, the header promises {expected} (truncated or corrupt)")
        bin_size = bin_path.stat().st_size
        if bin_size != t * code:
            raise ShardError(f"{bin_path}: {bin_size} bytes, the index promises {t * code} (truncated or corrupt)")
        idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        pos = _HEADER.size
        lengths = idx[pos : pos + 4 * n].view(np.int32)
        pos += 4 * n + pad
        offsets = idx[pos : pos + 8 * n].view(np.int64)
        pos += 8 * n
        doc_index = idx[pos : pos + 8 * (d + 1)].view(np.int64)
        tokens = np.memmap(bin_path, dtype=dtype, mode="r") if t else np.zeros(0, dtype=dtype)
        return cls(prefix, tokens, lengths, offsets, doc_index)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        off = int(self.offsets[i])
        return self.tokens[off : off + int(self.lengths[i])]

    def check_consistency(self) -> None:
        """Structural checks beyond the header: offsets, lengths and document boundaries agree."""
        n = len(self.lengths)
        if n and (self.lengths.min() < 0 or self.offsets[0] != 0):
            raise ShardError(f"{self.prefix}.idx: negative length or first offset not 0")
        if n > 1 and not np.array_equal(self.offsets[1:], self.offsets[:-1] + self.lengths[:-1]):
            raise ShardError(f"{self.prefix}.idx: sample offsets do not follow the lengths")
        if n and int(self.offsets[-1]) + int(self.lengths[-1]) != self.tokens.size:
            raise ShardError(f"{self.prefix}.idx: samples do not cover {self.prefix}.bin")
        doc = self.doc_index
        if len(doc) == 0 or doc[0] != 0 or doc[-1] != n or (len(doc) > 1 and np.any(np.diff(doc) < 0)):
            raise ShardError(f"{self.prefix}.idx: document boundaries are not a partition of the samples")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
