"""Tokenize documents and pack their sentences into training blocks (runs in worker processes).

Each document is tokenized once, whole; sentences are then found in TOKEN space, ending after a
terminal punctuation token (`.`, `!`, `?` and their relatives). Consecutive sentences of one document are
packed greedily into blocks of at most `max_tokens` (= max_len - 2, room for [CLS] and [SEP]). A sentence
longer than a block is cut every `max_tokens` tokens from its start, so nothing is ever dropped.

A spurious sentence end (an abbreviation like "e.g.") only adds a possible cut point: greedy packing
joins consecutive sentences again whenever they fit, so it costs nothing.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import numpy as np

from .readers import BadRecord, FieldSpec, Record, record_text

SENTENCE_END_TOKENS = (".", "!", "?", "\u3002", "\uff01", "\uff1f", "\u2026")


def sentence_cut_points(ids: np.ndarray, end_ids: np.ndarray, max_tokens: int) -> np.ndarray:
    """Sorted candidate block boundaries in [0, len(ids)]: sentence ends, plus a cut every `max_tokens`
    tokens inside any sentence longer than that. `end_ids` holds the sentence-ending token ids, or is a
    boolean table over the vocabulary marking them (faster)."""
    n = len(ids)
    is_end = end_ids[ids] if end_ids.dtype == bool else np.isin(ids, end_ids)
    ends = np.flatnonzero(is_end) + 1
    bounds = np.unique(np.concatenate(([0], ends, [n])))
    starts, stops = bounds[:-1], bounds[1:]
    long = np.flatnonzero(stops - starts > max_tokens)
    if long.size:
        extra = [np.arange(starts[i] + max_tokens, stops[i], max_tokens) for i in long]
        bounds = np.unique(np.concatenate([bounds, *extra]))
    return bounds


def pack_blocks(bounds: np.ndarray, max_tokens: int) -> np.ndarray:
    """Greedy packing over candidate cut points: each block ends at the furthest cut point that keeps it
    within `max_tokens`. Returns block lengths. One iteration per block, not per sentence."""
    lengths = []
    start, end = 0, int(bounds[-1])
    while start < end:
        k = int(np.searchsorted(bounds, start + max_tokens, side="right")) - 1
        stop = int(bounds[k])
        lengths.append(stop - start)
        start = stop
    return np.asarray(lengths, dtype=np.int32)


@dataclass
class ChunkResult:
    """What a worker sends back for one chunk of records."""

    chunk_id: int
    records: int
    tokens: np.ndarray  # all blocks of all good documents, concatenated
    lengths: np.ndarray  # int32 block lengths
    blocks_per_doc: np.ndarray  # int32, one entry per good document
    bad: list[tuple[int, int, str, str]] = field(default_factory=list)  # (file index, line, kind, detail)


class Packer:
    """Holds a tokenizer; turns record chunks into ChunkResults. One per worker process."""

    def __init__(self, tokenizer_json: str, max_tokens: int, dtype: str, formats: list[str], spec: FieldSpec):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_truncation()  # nothing is ever silently cut
        self.tokenizer.no_padding()
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.end_ids = np.zeros(max(vocab.values()) + 1, dtype=bool)  # a lookup table, True at sentence ends
        self.end_ids[[vocab[t] for t in SENTENCE_END_TOKENS if t in vocab]] = True
        self.max_tokens = max_tokens
        self.dtype = np.dtype(dtype)
        self.formats = formats
        self.spec = spec

    def __call__(self, chunk_id: int, records: list[Record]) -> ChunkResult:
        texts, good, bad = [], [], []
        for r in records:
            try:
                texts.append(record_text(self.formats[r.file_index], r.payload, self.spec))
                good.append(r)
            except BadRecord as e:
                bad.append((r.file_index, r.line, e.kind, e.detail))
        id_lists = [enc.ids for enc in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)] if texts else []
        sizes = [len(x) for x in id_lists]
        tokens = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=self.dtype, count=sum(sizes))
        lengths: list[int] = []
        per_doc: list[int] = []
        offset = 0
        for r, n in zip(good, sizes):
            if n == 0:
                bad.append((r.file_index, r.line, "empty document", "no tokens"))
            elif n <= self.max_tokens:  # the common short document: one block, no sentence search
                lengths.append(n)
                per_doc.append(1)
            else:
                ids = tokens[offset : offset + n]
                blocks = pack_blocks(sentence_cut_points(ids, self.end_ids, self.max_tokens), self.max_tokens)
                lengths.extend(blocks.tolist())
                per_doc.append(len(blocks))
            offset += n
        return ChunkResult(
            chunk_id=chunk_id,
            records=len(records),
            tokens=tokens,
            lengths=np.asarray(lengths, dtype=np.int32),
            blocks_per_doc=np.asarray(per_doc, dtype=np.int32),
            bad=sorted(bad, key=lambda b: (b[0], b[1])),
        )


_WORKER: Packer | None = None


def worker_init(*args) -> None:
    global _WORKER
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    _WORKER = Packer(*args)


def worker_run(job: tuple[int, list[Record]]) -> ChunkResult:
    assert _WORKER is not None, "worker_init was not called"
    return _WORKER(*job)
