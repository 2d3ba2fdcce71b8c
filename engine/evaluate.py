"""`dupmae eval`: a model as a retriever on BEIR-layout data, beside BM25.

    dupmae eval --model exports/demo --data data/wordnet
    dupmae eval --model exports/cranfield --data ../shared/data/cranfield --out report.json

BEIR layout: `corpus.jsonl` ({"_id", "title"?, "text"}), `queries.jsonl` ({"_id", "text"}),
`qrels/<split>.tsv` (query-id, corpus-id, score; a header line). Every problem in these files (bad JSON,
missing or duplicate ids, empty texts, judgments naming unknown queries or documents, bad scores) is
reported with file and line; the run stops unless `--skip-invalid` drops the offending entries.

Rows: the model's dense, BoW and hybrid modes (`engine/retrieval.py`) and BM25 (`bm25s`, English stemmer
and stopwords) on the same data in the same run. Metrics: NDCG@10, MRR@10 and Recall@100 computed by
`pytrec_eval` (trec_eval's measures `ndcg_cut_10`, `recip_rank` on the top 10, `recall_100`), averaged over
the queries that have judgments.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

METRICS = ("ndcg@10", "mrr@10", "recall@100")
MAX_REPORTED = 10


class EvalError(Exception):
    """A user-facing evaluation problem (bad BEIR files, missing model): exit code 2."""


# -- BEIR data -----------------------------------------------------------------------------------------

@dataclass
class BeirData:
    name: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    problems: list[str] = field(default_factory=list)


def _read_jsonl(path: Path, kind: str, problems: list[str], empty: list[str]) -> list[tuple[str, str, int]]:
    """(id, text, line) of each valid record; problems appended as 'file:line: message', empty documents
    (kept) as 'file:line'."""
    rows, seen = [], {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                problems.append(f"{path}:{line_no}: not valid JSON ({e})")
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("_id"), (str, int)) or str(rec["_id"]) == "":
                problems.append(f"{path}:{line_no}: no \"_id\"")
                continue
            rid = str(rec["_id"])
            if rid in seen:
                problems.append(f"{path}:{line_no}: duplicate {kind} id {rid!r} (first on line {seen[rid]})")
                continue
            seen[rid] = line_no
            text, title = rec.get("text"), rec.get("title")
            if not isinstance(text, str) or (title is not None and not isinstance(title, str)):
                problems.append(f"{path}:{line_no}: {kind} {rid!r}: \"text\" (and \"title\") must be strings")
                continue
            if kind == "document" and title:
                text = f"{title} {text}".strip() if text.strip() else title
            if not text.strip():
                if kind == "query":
                    problems.append(f"{path}:{line_no}: query {rid!r} has an empty text")
                    continue
                empty.append(f"{path}:{line_no}")  # an empty document is legal BEIR: kept, it matches nothing
            rows.append((rid, text, line_no))
    return rows


def load_beir(folder: str | Path, split: str = "test", skip_invalid: bool = False, log=lambda m: None) -> BeirData:
    folder = Path(folder)
    paths = {"corpus": folder / "corpus.jsonl", "queries": folder / "queries.jsonl",
             "qrels": folder / "qrels" / f"{split}.tsv"}
    for what, p in paths.items():
        if not p.is_file():
            extra = ""
            if what == "qrels" and (folder / "qrels").is_dir():
                extra = f" (splits here: {', '.join(sorted(q.stem for q in (folder / 'qrels').glob('*.tsv')))})"
            raise EvalError(f"{p}: missing ({what} of a BEIR-layout folder){extra}")
    problems: list[str] = []
    empty: list[str] = []
    corpus = _read_jsonl(paths["corpus"], "document", problems, empty)
    queries = _read_jsonl(paths["queries"], "query", problems, empty)
    if empty:
        log(f"[eval] {len(empty)} document(s) with an empty text, kept (they match nothing): "
            f"{', '.join(empty[:3])}{' ...' if len(empty) > 3 else ''}")
    doc_set = {r[0] for r in corpus}
    query_set = {r[0] for r in queries}
    qrels: dict[str, dict[str, int]] = {}
    with open(paths["qrels"], encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if line_no == 1 and parts[:2] == ["query-id", "corpus-id"]:
                continue
            if len(parts) != 3:
                problems.append(f"{paths['qrels']}:{line_no}: expected 3 tab-separated fields, got {len(parts)}")
                continue
            qid, did, score = parts
            try:
                rel = int(score)
            except ValueError:
                problems.append(f"{paths['qrels']}:{line_no}: score {score!r} is not an integer")
                continue
            if qid not in query_set:
                problems.append(f"{paths['qrels']}:{line_no}: query id {qid!r} is not in {paths['queries'].name}")
                continue
            if did not in doc_set:
                problems.append(f"{paths['qrels']}:{line_no}: corpus id {did!r} is not in {paths['corpus'].name}")
                continue
            qrels.setdefault(qid, {})[did] = rel
    if not any(r > 0 for judged in qrels.values() for r in judged.values()) and not problems:
        problems.append(f"{paths['qrels']}: no positive judgment")
    if problems:
        shown = "\n  ".join(problems[:MAX_REPORTED])
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        if not skip_invalid:
            raise EvalError(f"{folder}: {len(problems)} problem(s) in the BEIR files:\n  {shown}{more}\n"
                            "fix them, or pass --skip-invalid to leave those entries out")
        log(f"[eval] leaving out {len(problems)} invalid entries:\n  {shown}{more}")
    judged = [r for r in queries if r[0] in qrels and any(v > 0 for v in qrels[r[0]].values())]
    if not corpus or not judged:
        raise EvalError(f"{folder}: nothing to evaluate ({len(corpus)} documents, {len(judged)} judged queries)")
    return BeirData(folder.resolve().name, [r[0] for r in corpus], [r[1] for r in corpus],
                    [r[0] for r in judged], [r[1] for r in judged], qrels, problems)


def subsample(data: BeirData, max_queries: int | None = None, max_documents: int | None = None,
              seed: int = 0) -> BeirData:
    """A smaller task from the same files, for quick runs on slow machines: the first `max_queries` judged
    queries (file order), every document judged for them, and a seeded random choice of the others up to
    `max_documents`. Fewer distractors make the task easier for every row alike (BM25 included)."""
    import numpy as np

    qn = len(data.query_ids) if not max_queries else min(max_queries, len(data.query_ids))
    query_ids, query_texts = data.query_ids[:qn], data.query_texts[:qn]
    qrels = {q: data.qrels[q] for q in query_ids}
    if not max_documents or max_documents >= len(data.corpus_ids):
        keep = np.arange(len(data.corpus_ids))
    else:
        judged = {d for q in query_ids for d in qrels[q]}
        pos = {d: i for i, d in enumerate(data.corpus_ids)}
        must = sorted(pos[d] for d in judged)
        others = np.array(sorted(set(range(len(data.corpus_ids))) - set(must)), dtype=np.int64)
        extra = max(0, max_documents - len(must))
        pick = np.random.default_rng(seed).choice(len(others), min(extra, len(others)), replace=False)
        keep = np.sort(np.concatenate([np.array(must, dtype=np.int64), others[pick]]))
    return BeirData(data.name, [data.corpus_ids[i] for i in keep], [data.corpus_texts[i] for i in keep],
                    query_ids, query_texts, qrels, data.problems)


# -- metrics and BM25 ----------------------------------------------------------------------------------

def run_from_ranking(data: BeirData, scores, indices) -> dict[str, dict[str, float]]:
    """pytrec_eval's run format: {query id: {doc id: score}}."""
    run = {}
    for qi, qid in enumerate(data.query_ids):
        run[qid] = {data.corpus_ids[int(d)]: float(s) for s, d in zip(scores[qi], indices[qi])}
    return run


def metrics(qrels: dict, run: dict, per_query: dict | None = None) -> dict[str, float]:
    """NDCG@10, MRR@10, Recall@100 (means over the judged queries) by pytrec_eval; with a `per_query` dict,
    also each query's values there (for paired significance tests between systems)."""
    import pytrec_eval

    def top(n):
        return {q: dict(sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))[:n]) for q, docs in run.items()}

    qrels = {q: j for q, j in qrels.items() if q in run}
    full = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(top(100))
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top(10))
    n = len(qrels)
    for q in qrels:  # a judged query with nothing retrieved scores 0, not "absent"
        full.setdefault(q, {"ndcg_cut_10": 0.0, "recall_100": 0.0})
        rr.setdefault(q, {"recip_rank": 0.0})
    if per_query is not None:
        per_query.update({q: {"ndcg@10": full[q]["ndcg_cut_10"], "mrr@10": rr[q]["recip_rank"],
                              "recall@100": full[q]["recall_100"]} for q in sorted(qrels)})
    return {"ndcg@10": sum(v["ndcg_cut_10"] for v in full.values()) / n,
            "mrr@10": sum(v["recip_rank"] for v in rr.values()) / n,
            "recall@100": sum(v["recall_100"] for v in full.values()) / n}


def bm25_search(data: BeirData, k: int = 100):
    """bm25s (Lucene BM25, k1 1.5, b 0.75) with an English Snowball stemmer and stopwords."""
    import bm25s
    import numpy as np
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(data.corpus_texts, stopwords="en", stemmer=stemmer, show_progress=False),
                    show_progress=False)
    k = min(k, len(data.corpus_ids))
    q_tokens = bm25s.tokenize(data.query_texts, stopwords="en", stemmer=stemmer, show_progress=False)
    idx, scores = retriever.retrieve(q_tokens, k=k, show_progress=False, n_threads=1)
    return np.asarray(scores), np.asarray(idx)


# -- the command ---------------------------------------------------------------------------------------

def evaluate(model: str | Path | None, data_dir: str | Path, split: str = "test", modes=("dense", "bow", "hybrid"),
             bm25: bool = True, batch_size: int = 64, cache_dir: str | Path | None = None,
             bow_weight: float | None = None,
             skip_invalid: bool = False, progress: bool = True, log=lambda m: None, max_queries: int | None = None,
             max_documents: int | None = None, per_query: bool = False, **rep_overrides) -> dict:
    """Evaluate and return the report (also what `--out` writes); with `per_query`, the report's "per_query"
    holds every judged query's metrics for each row."""
    from .retrieval import cached_encode, search

    t0 = time.perf_counter()
    data = load_beir(data_dir, split, skip_invalid=skip_invalid, log=log)
    if max_queries or max_documents:
        data = subsample(data, max_queries, max_documents)
    evaluated = set(data.query_ids)
    n_judgments = sum(len(v) for q, v in data.qrels.items() if q in evaluated)
    log(f"[eval] {data.name}/{split}: {len(data.corpus_ids):,} documents, {len(data.query_ids):,} judged queries, "
        f"{n_judgments:,} judgments")
    report = {"data": str(Path(data_dir).resolve()), "split": split, "documents": len(data.corpus_ids),
              "queries": len(data.query_ids), "judgments": n_judgments,
              "subsample": {"max_queries": max_queries, "max_documents": max_documents, "seed": 0}
              if (max_queries or max_documents) else None, "invalid_entries": len(data.problems),
              "metrics_library": "pytrec_eval", "rows": {}, "seconds": {}}
    if model is not None and modes:
        from .encoder import DupMAEEncoder, parts_for

        try:
            encoder = DupMAEEncoder.from_pretrained(model, **rep_overrides)
        except (OSError, ValueError) as e:
            raise EvalError(f"--model {model}: {e}") from e
        if bow_weight is None:  # the model's own weight (a fine-tuned export records what it was trained with)
            bow_weight = model_bow_weight(encoder.source)
        report["model"] = encoder.describe() | {"bow_weight": bow_weight}
        t = time.perf_counter()
        parts = parts_for(modes)  # a dense-only evaluation never projects onto the vocabulary
        docs = cached_encode(encoder, data.corpus_texts, "document", cache_dir, batch_size, progress,
                             "encoding the corpus", log, modes=parts)
        queries = cached_encode(encoder, data.query_texts, "query", cache_dir, batch_size, progress,
                                "encoding the queries", log, modes=parts)
        report["seconds"]["encode"] = round(time.perf_counter() - t, 2)
        for mode in modes:
            t = time.perf_counter()
            scores, idx = search(queries, docs, mode, k=100, bow_weight=bow_weight)
            report["rows"][mode] = metrics(data.qrels, run_from_ranking(data, scores, idx),
                                           report.setdefault("per_query", {}).setdefault(mode, {})
                                           if per_query else None)
            report["seconds"][mode] = round(time.perf_counter() - t, 2)
    if bm25:
        t = time.perf_counter()
        scores, idx = bm25_search(data)
        report["rows"]["bm25"] = metrics(data.qrels, run_from_ranking(data, scores, idx),
                                         report.setdefault("per_query", {}).setdefault("bm25", {})
                                         if per_query else None)
        report["seconds"]["bm25"] = round(time.perf_counter() - t, 2)
    report["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    return report


def model_bow_weight(folder) -> float:
    """representation.bow_weight of a model folder's dupmae.json (a fine-tuned export), else 1.0 (the paper)."""
    path = Path(folder) / "dupmae.json"
    if path.is_file():
        w = json.loads(path.read_text(encoding="utf-8")).get("representation", {}).get("bow_weight")
        if isinstance(w, (int, float)) and w > 0:
            return float(w)
    return 1.0


def format_table(report: dict, title: str | None = None) -> str:
    lines = []
    if title:
        lines.append(title)
    head = f"{'':<10}" + "".join(f"{m:>12}" for m in METRICS)
    lines += [head, "-" * len(head)]
    for name, row in report["rows"].items():
        lines.append(f"{name:<10}" + "".join(f"{row[m]:>12.4f}" for m in METRICS))
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--model", default=None,
                   help="a `dupmae export` folder or any local BERT folder (omit with --bm25-only)")
    p.add_argument("--data", required=True, help="a BEIR-layout folder: corpus.jsonl, queries.jsonl, qrels/")
    p.add_argument("--split", default="test", help="qrels/<split>.tsv (default test)")
    p.add_argument("--modes", default="dense,bow,hybrid", help="comma-separated: dense, bow, hybrid")
    p.add_argument("--no-bm25", action="store_true", help="leave out the BM25 row")
    p.add_argument("--bm25-only", action="store_true", help="only the BM25 row (no model)")
    p.add_argument("--bow-weight", type=float, default=None,
                   help="hybrid = dense + w * bow (default: the model's dupmae.json, else 1: the paper)")
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
    p.add_argument("--max-queries", type=int, default=None, help="evaluate the first N judged queries only")
    p.add_argument("--max-documents", type=int, default=None,
                   help="search a seeded sample of N documents (always including every judged one)")
    p.add_argument("--skip-invalid", action="store_true", help="leave out invalid entries instead of stopping")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--per-query", action="store_true",
                   help="the report also holds every query's metrics per row (for paired significance tests)")
    p.add_argument("--no-progress", action="store_true")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dupmae" / "embeddings"


def run_from_args(args) -> int:
    modes = [] if args.bm25_only else [m.strip() for m in args.modes.split(",") if m.strip()]
    from .retrieval import MODES

    bad = [m for m in modes if m not in MODES]
    if bad:
        raise EvalError(f"--modes: unknown {', '.join(bad)} (choose from {', '.join(MODES)})")
    if modes and args.model is None:
        raise EvalError("--model is required (or --bm25-only)")
    if args.no_bm25 and not modes:
        raise EvalError("nothing to evaluate: --no-bm25 with no model mode")
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())

    def log(m):
        print(m, file=sys.stderr, flush=True)

    report = evaluate(args.model, args.data, args.split, modes, bm25=not args.no_bm25, batch_size=args.batch_size,
                      cache_dir=cache, bow_weight=args.bow_weight, skip_invalid=args.skip_invalid,
                      progress=not args.no_progress, log=log, bow_top_k=args.top_k, query_top_k=args.query_top_k,
                      dense=args.dense, normalize=args.normalize, max_length=args.max_length, max_queries=args.max_queries,
                      max_documents=args.max_documents, per_query=args.per_query)
    sampled = " (a seeded sample)" if report["subsample"] else ""
    title = (f"{report['documents']:,} documents{sampled}, {report['queries']:,} queries "
             f"({Path(args.data).name}/{args.split})"
             + (f", model {args.model}" if args.model else ""))
    print(format_table(report, title))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"report: {out}")
    return 0
