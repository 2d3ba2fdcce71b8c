"""Exact search over an encoded corpus, and the on-disk embedding cache.

Modes (paper section 3.4):
    dense    dense_q . dense_d                                   faiss IndexFlatIP (exact inner product);
                                                                 blocks of numpy products without faiss
    bow      sum over d's kept ids i of mu_q[i] * mu_d[i]        sparse matrix products (scipy)
    hybrid   dense + bow_weight * bow                            both, over every document, exactly

Queries are scored in blocks (`block` queries at a time), so memory is block x corpus scores, never
queries x corpus. Ties are broken by corpus order, so results are deterministic.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .encoder import Encoded

MODES = ("dense", "bow", "hybrid")


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the k best (descending score, ascending column on ties)."""
    n = scores.shape[1]
    k = min(k, n)
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.tile(np.arange(n), (len(scores), 1))
    cand = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -cand), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(scores, idx, axis=1), idx


def search(queries: Encoded, corpus: Encoded, mode: str, k: int = 100, bow_weight: float = 1.0,
           block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(scores, corpus indices), each (n_queries, min(k, n_docs)), best first."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if len(corpus) == 0:
        raise ValueError("the corpus is empty")
    for what, e in (("queries", queries), ("corpus", corpus)):
        if mode in ("bow", "hybrid") and not e.has_bow:
            raise ValueError(f"search mode {mode!r}: the {what} were encoded without their BoW part "
                             f"(modes={tuple(e.meta.get('modes', ('dense',)))}): encode with modes including 'bow'")
        if mode in ("dense", "hybrid") and not e.has_dense:
            raise ValueError(f"search mode {mode!r}: the {what} were encoded without their dense part "
                             f"(modes={tuple(e.meta.get('modes', ('bow',)))}): encode with modes including 'dense'")
    if mode == "dense":
        try:
            import faiss
        except ImportError:  # the `eval` extra is not installed: the same exact search, block by block
            faiss = None
    if mode == "dense" and faiss is not None:
        index = faiss.IndexFlatIP(corpus.dense.shape[1])
        index.add(np.ascontiguousarray(corpus.dense, dtype=np.float32))
        scores, idx = index.search(np.ascontiguousarray(queries.dense, dtype=np.float32), min(k, len(corpus)))
        # faiss orders equal scores arbitrarily: re-sort each row by (score desc, index asc)
        order = np.lexsort((idx, -scores), axis=1)
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(idx, order, axis=1)

    if mode != "dense":
        docs_t = corpus.bow_matrix().T.tocsr()  # vocab x docs
        q_bow = queries.bow_matrix()
    all_scores, all_idx = [], []
    for q0 in range(0, len(queries), block):
        q1 = min(q0 + block, len(queries))
        if mode == "dense":
            s = np.asarray(queries.dense[q0:q1], dtype=np.float32) @ np.asarray(corpus.dense, dtype=np.float32).T
        else:
            s = np.asarray((q_bow[q0:q1] @ docs_t).todense(), dtype=np.float32)
        if mode == "hybrid":
            s = queries.dense[q0:q1] @ corpus.dense.T + bow_weight * s
        sc, ix = _top_k(s, k)
        all_scores.append(sc)
        all_idx.append(ix)
    return np.concatenate(all_scores), np.concatenate(all_idx)


# -- embedding cache -----------------------------------------------------------------------------------

def model_fingerprint(folder: str | Path) -> str:
    """Changes when the model's weights or settings change (file names, sizes, mtimes; settings content)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".txt"):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def texts_fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def cached_encode(encoder, texts: list[str], kind: str, cache_dir: str | Path | None, batch_size: int = 64,
                  progress: bool = False, desc: str | None = None, log=lambda m: None,
                  modes=("dense", "bow")) -> Encoded:
    """`encoder.encode(...)`, read from / written to `cache_dir` (None: no cache). The key covers the model
    files (W_cls's `dense_projection.safetensors` included), the representation settings, the kind, the parts
    encoded (`modes`) and every text. A request for one part is also served from a cached file of both."""
    from .encoder import PARTS, parts_for

    parts = parts_for(modes)
    if cache_dir is None:
        return encoder.encode(texts, batch_size=batch_size, kind=kind, modes=parts, progress=progress, desc=desc)

    def path_for(p):
        key = hashlib.sha256(json.dumps([model_fingerprint(encoder.source), encoder.describe(), kind, list(p),
                                         texts_fingerprint(texts), len(texts)]).encode()).hexdigest()[:24]
        return Path(cache_dir) / f"{kind}-{key}.npz"

    path = path_for(parts)
    for candidate in ([path] if parts == PARTS else [path, path_for(PARTS)]):
        if not candidate.is_file():
            continue
        try:
            out = Encoded.load(candidate)
            if len(out) == len(texts):
                log(f"[eval] {len(texts):,} {kind} embeddings from the cache {candidate}")
                return _only(out, parts)
        except Exception as e:  # a damaged cache file is re-made, never trusted
            log(f"[eval] ignoring unreadable cache file {candidate}: {e}")
    out = encoder.encode(texts, batch_size=batch_size, kind=kind, modes=parts, progress=progress, desc=desc)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return out


def _only(e: Encoded, parts) -> Encoded:
    """`e` with the parts not in `parts` emptied."""
    n = len(e)
    dense = e.dense if "dense" in parts else np.zeros((n, 0), np.float32)
    if "bow" in parts:
        ids, values = e.bow_ids, e.bow_values
    else:
        ids, values = np.zeros((n, 0), np.int32), np.zeros((n, 0), np.float32)
    return Encoded(dense, ids, values, e.vocab_size, dict(e.meta, modes=list(parts)))
