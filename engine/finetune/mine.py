"""`dupmae mine`: hard negatives for stage-2 fine-tuning, mined with a model's own score.

    dupmae mine --model exports/stage1 --data ../shared/data/scifact --out work/scifact-hn.jsonl
    dupmae mine --model exports/stage1 --data train.jsonl --corpus corpus.jsonl --out train-hn.jsonl

1. Encode the corpus (kind "document") and the training queries (kind "query"); retrieve each query's top
   `depth` exactly with the model's score (`engine/retrieval.py`: hybrid = dense + bow_weight * BoW by default).
2. Candidates are the ranks `range` = A-B: 1-based, both ends inclusive (10-200: the 10th best to the 200th
   best, 191 candidates; FlagEmbedding's "10-210" is a Python slice, i.e. our 11-210).
3. Left out: the query's positives; every other document with a positive's text or the query's text; and
   every candidate scored too close to the positives to be trusted as a negative (likely false negatives,
   FlagEmbedding #856/#850): with p the lowest score of the query's positives (scored exactly, retrieved
   or not), a candidate is dropped when its score s > p - (1 - max_score_ratio) * |p|. For p > 0 that is
   s > 0.95 p, NV-Retriever's TopK-PercPos(95%); for p <= 0 (raw dot products can be negative) the same
   margin is taken below p, since 0.95 p would lie above the positive. `absolute_margin` m also drops
   s > p - m. Raw [CLS] and max-pooled-logit scores share a large common offset, which makes a relative
   margin strict: check the summary's dropped count, and prefer `--absolute-margin` on such scales.
4. Sample `negatives` of what remains: "random" draws without replacement from a numpy Generator seeded
   by SeedSequence([seed, sha256(query id)]) (a pure function of the seed and the query id), "top" takes
   the best ranked. Negatives are written in rank order. A query with fewer candidates keeps fewer (the
   summary counts them); nothing random is added.

Output: FlagEmbedding jsonl, one line per query, `{"query", "pos", "neg", "query_id", "pos_ids", "neg_ids",
"neg_ranks", "neg_scores_retriever"}`, written atomically (`F.tmp`, then renamed). The id fields are for
audits; `neg_scores_retriever` is this retriever's score, not the teacher scores (`pos_scores`/`neg_scores`)
that distillation reads. Same inputs and seed: the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..encoder import Encoded
from ..evaluate import EvalError

SAMPLINGS = ("random", "top")


class MineError(EvalError):
    """A user-facing mining problem (bad options, files or model): exit code 2."""


@dataclass
class MineConfig:
    model: str
    data: str
    out: str
    corpus: str | None = None  # with a jsonl --data: the documents to mine from
    split: str = "train"
    mode: str = "hybrid"
    bow_weight: float | None = None  # None: the model's dupmae.json representation.bow_weight, else 1.0
    depth: int = 200
    range: str = "10-200"
    negatives: int = 15
    max_score_ratio: float | None = 0.95  # None: no relative margin
    absolute_margin: float | None = None
    sampling: str = "random"
    seed: int = 0
    batch_size: int = 64
    cache_dir: str | None = None
    skip_invalid: bool = False
    progress: bool = True
    representation: dict = field(default_factory=dict)  # DupMAEEncoder overrides (None: the model's setting)

    def window(self) -> tuple[int, int]:
        """The candidate ranks (first, last), 1-based and inclusive."""
        try:
            a, b = (int(x) for x in self.range.split("-"))
        except ValueError:
            raise MineError(f"--range {self.range!r}: expected FIRST-LAST, e.g. 10-200") from None
        if not 1 <= a <= b:
            raise MineError(f"--range {self.range}: ranks are 1-based and FIRST <= LAST")
        if b > self.depth:
            raise MineError(f"--range {self.range}: rank {b} is beyond --depth {self.depth} (raise --depth)")
        return a, b

    def validate(self) -> None:
        from ..retrieval import MODES

        if self.mode not in MODES:
            raise MineError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.sampling not in SAMPLINGS:
            raise MineError(f"--sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")
        if self.negatives < 1:
            raise MineError(f"--negatives must be >= 1, got {self.negatives}")
        if self.depth < 1:
            raise MineError(f"--depth must be >= 1, got {self.depth}")
        if self.seed < 0:
            raise MineError(f"--seed must be >= 0, got {self.seed}")
        self.window()
        if self.max_score_ratio is not None and not 0 < self.max_score_ratio <= 1:
            raise MineError(f"--max-score-ratio must be in (0, 1] (or off), got {self.max_score_ratio}")
        if self.absolute_margin is not None and self.absolute_margin < 0:
            raise MineError(f"--absolute-margin must be >= 0, got {self.absolute_margin}")
        if self.batch_size < 1:
            raise MineError(f"--batch-size must be >= 1, got {self.batch_size}")
        if Path(self.data).is_file() and self.corpus is None:
            raise MineError(f"--data {self.data} is a jsonl file: name the documents to mine from with --corpus")


# -- inputs --------------------------------------------------------------------------------------------

@dataclass
class MiningTask:
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    positives: list[list[tuple[str | None, str]]]  # per query: (corpus id, or None outside the corpus; text)


def load_beir_task(folder, split: str, skip_invalid: bool = False, log=lambda m: None) -> MiningTask:
    """Training queries and their positives (qrels score > 0, in qrels order) from a BEIR folder."""
    from ..evaluate import load_beir

    data = load_beir(folder, split, skip_invalid=skip_invalid, log=log)
    text = dict(zip(data.corpus_ids, data.corpus_texts))
    positives = [[(d, text[d]) for d, rel in data.qrels[q].items() if rel > 0] for q in data.query_ids]
    return MiningTask(data.corpus_ids, data.corpus_texts, data.query_ids, data.query_texts, positives)


def _jsonl_records(path: Path):
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise MineError(f"{path}:{line_no}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise MineError(f"{path}:{line_no}: expected a JSON object")
            yield line_no, rec


def load_corpus(path) -> tuple[list[str], list[str]]:
    """(ids, texts) of a BEIR corpus.jsonl ({"_id", "title"?, "text"}, the title joined as `dupmae eval` does)
    or a jsonl of {"text"} (ids: the 0-based record numbers)."""
    path = Path(path)
    if not path.is_file():
        raise MineError(f"--corpus {path}: no such file")
    ids, texts = [], []
    for line_no, rec in _jsonl_records(path):
        text, title = rec.get("text"), rec.get("title")
        if not isinstance(text, str) or (title is not None and not isinstance(title, str)):
            raise MineError(f"{path}:{line_no}: \"text\" (and \"title\") must be strings")
        if title:
            text = f"{title} {text}".strip() if text.strip() else title
        ids.append(str(rec["_id"]) if "_id" in rec else str(len(ids)))
        texts.append(text)
    if len(set(ids)) != len(ids):
        raise MineError(f"{path}: duplicate \"_id\" values")
    if not ids:
        raise MineError(f"{path}: no documents")
    return ids, texts


def load_jsonl_task(path, corpus) -> MiningTask:
    """FlagEmbedding training jsonl ({"query", "pos": [str], "neg"?}; its negatives are replaced) and the
    corpus to mine from; positives are matched to the corpus by text. Query ids: "query_id" if present,
    else the line number."""
    path = Path(path)
    corpus_ids, corpus_texts = load_corpus(corpus)
    first_id = {}
    for i, t in zip(corpus_ids, corpus_texts):
        first_id.setdefault(t, i)
    qids, queries, positives = [], [], []
    for line_no, rec in _jsonl_records(path):
        q, pos = rec.get("query"), rec.get("pos")
        if not isinstance(q, str) or not q.strip():
            raise MineError(f"{path}:{line_no}: \"query\" must be a non-empty string")
        if not isinstance(pos, list) or not pos or not all(isinstance(p, str) for p in pos):
            raise MineError(f"{path}:{line_no}: \"pos\" must be a non-empty list of strings")
        qids.append(str(rec.get("query_id", line_no)))
        queries.append(q)
        positives.append([(first_id.get(p), p) for p in pos])
    if len(set(qids)) != len(qids):
        raise MineError(f"{path}: duplicate query ids")
    if not qids:
        raise MineError(f"{path}: no training queries")
    return MiningTask(corpus_ids, corpus_texts, qids, queries, positives)


# -- the selection (pure functions) --------------------------------------------------------------------

def query_rng(seed: int, query_id: str) -> np.random.Generator:
    """The generator of one query's sample: a pure function of (seed, query id), never of run order."""
    digest = int.from_bytes(hashlib.sha256(query_id.encode("utf-8")).digest()[:16], "little")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, digest])))


def margin_threshold(positive_score: float, max_score_ratio: float | None,
                     absolute_margin: float | None) -> float | None:
    """Scores above this are likely false negatives (None: no margin rule)."""
    p = float(positive_score)
    t = None
    if max_score_ratio is not None:
        t = p - (1.0 - max_score_ratio) * abs(p)  # = ratio * p when p > 0
    if absolute_margin is not None:
        t = p - absolute_margin if t is None else min(t, p - absolute_margin)
    return t


@dataclass
class Selection:
    ranks: list[int]  # 0-based positions in the ranking, ascending
    margin_dropped: int  # in the window: within the margin of the positives
    same_text_dropped: int  # in the window: a positive's or the query's text


def select_negatives(rows, scores, window: tuple[int, int], positive_rows: set, same_text_rows: set,
                     threshold: float | None, n: int, sampling: str, rng: np.random.Generator) -> Selection:
    """Negatives from one query's ranking (`rows`, `scores`: corpus rows best first)."""
    eligible, margin, same = [], 0, 0
    for r in range(window[0] - 1, min(window[1], len(rows))):
        row = int(rows[r])
        if row in positive_rows:
            continue
        if row in same_text_rows:
            same += 1
        elif threshold is not None and scores[r] > threshold:
            margin += 1
        else:
            eligible.append(r)
    if sampling == "top" or len(eligible) <= n:
        chosen = eligible[:n]
    else:
        chosen = [eligible[i] for i in np.sort(rng.choice(len(eligible), n, replace=False))]
    return Selection(chosen, margin, same)


def pair_scores(queries: Encoded, q_rows, docs: Encoded, d_rows, mode: str, bow_weight: float,
                chunk: int = 256) -> np.ndarray:
    """score(query q_rows[i], document d_rows[i]) for each i: what `search` ranks by."""
    q_rows, d_rows = np.asarray(q_rows, np.int64), np.asarray(d_rows, np.int64)
    out = np.zeros(len(q_rows), np.float32)

    def sub(e: Encoded, idx) -> Encoded:
        return Encoded(e.dense[idx], e.bow_ids[idx], e.bow_values[idx], e.vocab_size)

    for c0 in range(0, len(q_rows), chunk):
        qi, di = q_rows[c0 : c0 + chunk], d_rows[c0 : c0 + chunk]
        s = np.zeros(len(qi), np.float32)
        if mode != "bow":
            s += np.einsum("ij,ij->i", queries.dense[qi], docs.dense[di])
        if mode != "dense":
            bow = np.asarray(sub(queries, qi).bow_matrix().multiply(sub(docs, di).bow_matrix()).sum(axis=1))
            s += (bow_weight if mode == "hybrid" else 1.0) * bow.ravel().astype(np.float32)
        out[c0 : c0 + len(qi)] = s
    return out


# -- the command ---------------------------------------------------------------------------------------

def _model_bow_weight(folder) -> float:
    path = Path(folder) / "dupmae.json"
    if path.is_file():
        w = json.loads(path.read_text(encoding="utf-8")).get("representation", {}).get("bow_weight")
        if w is not None:
            return float(w)
    return 1.0


def _write_atomically(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def lowest_positive_scores(task: MiningTask, row_of: dict, encoder, queries: Encoded, docs: Encoded, mode: str,
                           bow_weight: float, batch_size: int) -> tuple[np.ndarray, int]:
    """Each query's lowest positive score, every positive scored exactly (retrieved or not; those outside the
    corpus encoded here), and the number of positives outside the corpus."""
    outside = sorted({t for pos in task.positives for d, t in pos if d is None})
    extra = encoder.encode(outside, batch_size=batch_size, kind="document") if outside else None
    extra_row = {t: i for i, t in enumerate(outside)}
    pairs_in = [(qi, row_of[d]) for qi, pos in enumerate(task.positives) for d, _ in pos if d is not None]
    pairs_out = [(qi, extra_row[t]) for qi, pos in enumerate(task.positives) for d, t in pos if d is None]
    lowest = np.full(len(task.query_ids), np.inf)
    for pairs, enc in ((pairs_in, docs), (pairs_out, extra)):
        if pairs:
            qi, di = np.array(pairs).T
            np.minimum.at(lowest, qi, pair_scores(queries, qi, enc, di, mode, bow_weight).astype(np.float64))
    return lowest, len(pairs_out)


def mine(cfg: MineConfig, log=lambda m: None) -> dict:
    """Mine, write `cfg.out`, return the summary."""
    from dupmae.data_pipeline.tokenizer import TokenizerError

    from ..encoder import DupMAEEncoder
    from ..retrieval import cached_encode, search

    t0 = time.perf_counter()
    cfg.validate()
    window = cfg.window()
    data = Path(cfg.data)
    if data.is_file():
        task = load_jsonl_task(data, cfg.corpus)
    elif data.is_dir():
        task = load_beir_task(data, cfg.split, cfg.skip_invalid, log)
    else:
        raise MineError(f"--data {data}: no such folder or file")
    try:
        encoder = DupMAEEncoder.from_pretrained(cfg.model, **cfg.representation)
    except (OSError, ValueError, TokenizerError) as e:
        raise MineError(f"--model {cfg.model}: {e}") from e
    bow_weight = cfg.bow_weight if cfg.bow_weight is not None else _model_bow_weight(encoder.source)
    n_docs, n_queries = len(task.corpus_ids), len(task.query_ids)
    log(f"[mine] {n_queries:,} queries, {n_docs:,} documents; {cfg.mode}"
        + (f" (bow_weight {bow_weight:g})" if cfg.mode == "hybrid" else "")
        + f", depth {cfg.depth}, ranks {window[0]}-{window[1]}, {cfg.negatives} negatives ({cfg.sampling}), "
        f"seed {cfg.seed}")

    docs = cached_encode(encoder, task.corpus_texts, "document", cfg.cache_dir, cfg.batch_size, cfg.progress,
                         "encoding the corpus", log)
    queries = cached_encode(encoder, task.query_texts, "query", cfg.cache_dir, cfg.batch_size, cfg.progress,
                            "encoding the queries", log)
    scores, ranking = search(queries, docs, cfg.mode, k=cfg.depth, bow_weight=bow_weight)

    row_of = {d: i for i, d in enumerate(task.corpus_ids)}
    rows_by_text: dict[str, list[int]] = {}
    for i, t in enumerate(task.corpus_texts):
        rows_by_text.setdefault(t, []).append(i)
    lowest, n_outside = lowest_positive_scores(task, row_of, encoder, queries, docs, cfg.mode, bow_weight,
                                               cfg.batch_size)

    lines, counts = [], []
    margin_dropped = same_dropped = retrieved = judged = 0
    for qi, (qid, query) in enumerate(zip(task.query_ids, task.query_texts)):
        pos = task.positives[qi]
        positive_rows = {row_of[d] for d, _ in pos if d is not None}
        same_text = {r for t in [query] + [t for _, t in pos] for r in rows_by_text.get(t, ())} - positive_rows
        top = set(ranking[qi].tolist())
        retrieved += len(positive_rows & top)
        judged += len(positive_rows)
        threshold = margin_threshold(lowest[qi], cfg.max_score_ratio, cfg.absolute_margin)
        sel = select_negatives(ranking[qi], scores[qi], window, positive_rows, same_text, threshold,
                               cfg.negatives, cfg.sampling, query_rng(cfg.seed, qid))
        margin_dropped += sel.margin_dropped
        same_dropped += sel.same_text_dropped
        counts.append(len(sel.ranks))
        neg_rows = [int(ranking[qi][r]) for r in sel.ranks]
        record = {"query": query, "pos": [t for _, t in pos], "neg": [task.corpus_texts[r] for r in neg_rows],
                  "query_id": qid, "pos_ids": [d for d, _ in pos], "neg_ids": [task.corpus_ids[r] for r in neg_rows],
                  "neg_ranks": [r + 1 for r in sel.ranks],
                  "neg_scores_retriever": [round(float(scores[qi][r]), 6) for r in sel.ranks]}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    _write_atomically(Path(cfg.out), lines)

    counts = np.array(counts)
    summary = {"queries": n_queries, "documents": n_docs, "mode": cfg.mode, "bow_weight": bow_weight,
               "mean_negatives": round(float(counts.mean()), 3),
               "queries_short": int((counts < cfg.negatives).sum()), "queries_without": int((counts == 0).sum()),
               "dropped_margin": margin_dropped, "dropped_same_text": same_dropped,
               "positives": judged + n_outside, "positives_outside_corpus": n_outside,
               "positives_retrieved": retrieved, "recall_at_depth": round(retrieved / judged, 4) if judged else None,
               "seconds": round(time.perf_counter() - t0, 2), "out": str(cfg.out)}
    log(format_summary(summary, cfg))
    return summary


def format_summary(s: dict, cfg: MineConfig) -> str:
    lines = [f"[mine] {s['queries']:,} queries: {s['mean_negatives']:.2f} negatives per query on average, "
             f"{s['queries_short']:,} with fewer than {cfg.negatives} ({s['queries_without']:,} with none)",
             f"[mine] dropped as likely false negatives (ranks {cfg.range}): {s['dropped_margin']:,} within the "
             f"score margin, {s['dropped_same_text']:,} with a positive's or the query's text"]
    if s["recall_at_depth"] is not None:
        lines.append(f"[mine] positives retrieved within depth {cfg.depth}: {s['positives_retrieved']:,} of "
                     f"{s['positives'] - s['positives_outside_corpus']:,} (recall@{cfg.depth} "
                     f"{s['recall_at_depth']:.4f})")
    if s["positives_outside_corpus"]:
        lines.append(f"[mine] {s['positives_outside_corpus']:,} positive(s) not found in the corpus (scored, "
                     "never retrieved)")
    lines.append(f"[mine] wrote {s['out']} in {s['seconds']:.1f} s")
    return "\n".join(lines)


def _ratio(value: str) -> float | None:
    return None if value.lower() in ("off", "none") else float(value)


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="a `dupmae export` folder, a local BERT folder or a package name")
    p.add_argument("--data", required=True,
                   help="a BEIR folder (positives from qrels/<split>.tsv, mined from its corpus), or a "
                        "FlagEmbedding jsonl ({query, pos}) with --corpus")
    p.add_argument("--corpus", default=None,
                   help="with a jsonl --data: a BEIR corpus.jsonl or a jsonl of {\"text\"} to mine from")
    p.add_argument("--out", required=True, help="the FlagEmbedding jsonl to write")
    p.add_argument("--split", default="train", help="qrels/<split>.tsv of a BEIR --data (default train)")
    p.add_argument("--mode", default="hybrid", help="the retrieval score: hybrid (default), dense or bow")
    p.add_argument("--bow-weight", type=float, default=None,
                   help="hybrid = dense + w * bow (default: the model's dupmae.json, else 1)")
    p.add_argument("--depth", type=int, default=200, help="documents retrieved per query (default 200)")
    p.add_argument("--range", default="10-200",
                   help="candidate ranks FIRST-LAST, 1-based, both inclusive (default 10-200)")
    p.add_argument("--negatives", type=int, default=15, help="negatives per query (default 15)")
    p.add_argument("--max-score-ratio", type=_ratio, default=0.95,
                   help="drop candidates scoring above p - (1-r)|p|, p the lowest positive score (= r*p for "
                        "p > 0; default 0.95; 'off' disables)")
    p.add_argument("--absolute-margin", type=float, default=None,
                   help="also drop candidates scoring above p - m (default: off)")
    p.add_argument("--sampling", default="random", help="random (default) or top")
    p.add_argument("--seed", type=int, default=0, help="with the query id, seeds each query's sample (default 0)")
    p.add_argument("--top-k", type=int, default=None, help="BoW entries kept per document (default: dupmae.json)")
    p.add_argument("--query-top-k", type=int, default=None, help="BoW entries kept per query (0: all)")
    p.add_argument("--dense", default=None, choices=["cls", "mean"], help="dense vector (default: dupmae.json)")
    p.add_argument("--normalize", action="store_true", default=None,
                   help="L2-normalize the dense vectors (cosine instead of dot product)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (default: dupmae.json)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cache-dir", default=None,
                   help="embedding cache (default $XDG_CACHE_HOME/dupmae/embeddings, i.e. ~/.cache/...)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached embeddings")
    p.add_argument("--skip-invalid", action="store_true", help="leave out invalid BEIR entries instead of stopping")
    p.add_argument("--no-progress", action="store_true")


def run_from_args(args) -> int:
    from ..evaluate import default_cache_dir

    cfg = MineConfig(model=args.model, data=args.data, out=args.out, corpus=args.corpus, split=args.split,
                     mode=args.mode, bow_weight=args.bow_weight, depth=args.depth, range=args.range,
                     negatives=args.negatives, max_score_ratio=args.max_score_ratio,
                     absolute_margin=args.absolute_margin, sampling=args.sampling, seed=args.seed,
                     batch_size=args.batch_size,
                     cache_dir=None if args.no_cache else str(args.cache_dir or default_cache_dir()),
                     skip_invalid=args.skip_invalid, progress=not args.no_progress,
                     representation={"bow_top_k": args.top_k, "query_top_k": args.query_top_k, "dense": args.dense,
                                     "normalize": args.normalize, "max_length": args.max_length})
    mine(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0
