"""Why the BoW rows of an export score as they do: the full mu of every document and query, how much the
documents' top-k sets overlap, and NDCG@10 / MRR@10 / Recall@100 of a few scoring variants on the same mu.

    python benchmarks/bow_analysis.py work/exports/cranfield-cpu --data ../shared/data/cranfield --max-length 256

Variants (none is the default representation; this is a diagnosis, not a tuned setting):
    paper                  raw mu, documents cut to their top k, queries keep all of mu (what `dupmae eval` does)
    query top-k            queries cut to their top k as well
    corpus-centred         mu minus its mean over the corpus (an IDF-like correction), documents and queries
    corpus-centred, top-k  the same with queries cut to their top k
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cranfield"))
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=384)
    args = ap.parse_args()

    from dupmae.engine.encoder import DupMAEEncoder, Encoded
    from dupmae.engine.evaluate import load_beir, metrics, run_from_ranking
    from dupmae.engine.retrieval import search

    data = load_beir(args.data)
    enc = DupMAEEncoder.from_pretrained(args.model, device="cpu", bow_top_k=10**9, query_top_k=0,
                                        max_length=args.max_length)
    docs = enc.encode(data.corpus_texts, batch_size=32, progress=True)
    queries = enc.encode(data.query_texts, batch_size=64, kind="query", progress=True)
    d_mu, q_mu, k, vocab = docs.bow_values, queries.bow_values, args.top_k, enc.vocab_size

    top = np.argpartition(-d_mu, k - 1, axis=1)[:, :k]
    rng = np.random.default_rng(0)
    pairs = [(a, b) for a, b in rng.integers(0, len(top), (300, 2)) if a != b]
    jaccard = np.mean([len(set(top[a]) & set(top[b])) / len(set(top[a]) | set(top[b])) for a, b in pairs])
    counts = np.bincount(top.reshape(-1), minlength=vocab)
    print(f"documents' top-{k} sets: mean Jaccard of {len(pairs)} random pairs {jaccard:.2f}; "
          f"{int((counts > 0.9 * len(top)).sum())} ids are in the top {k} of more than 90% of the documents")

    def sparse(mu: np.ndarray, dense: np.ndarray, kk: int) -> Encoded:
        if kk == 0:
            return Encoded(dense, np.zeros((len(mu), 0), np.int32), mu.astype(np.float32), vocab)
        ids = np.argpartition(-mu, kk - 1, axis=1)[:, :kk]
        return Encoded(dense, ids.astype(np.int32), np.take_along_axis(mu, ids, 1).astype(np.float32), vocab)

    dense_scores = np.abs(queries.dense @ docs.dense.T)
    bow_scores = np.abs(search(sparse(q_mu, queries.dense, 0), sparse(d_mu, docs.dense, k), "bow",
                               k=len(docs))[0])
    print(f"median |score|: dense {np.median(dense_scores):.1f}, BoW {np.median(bow_scores):.1f} "
          f"({np.median(bow_scores) / np.median(dense_scores):.0f}x): an unscaled hybrid is about the BoW ranking")

    mean = d_mu.mean(0)
    variants = {"paper": (q_mu, d_mu, 0), f"query top-{k}": (q_mu, d_mu, k),
                "corpus-centred": (q_mu - mean, d_mu - mean, 0),
                f"corpus-centred, query top-{k}": (q_mu - mean, d_mu - mean, k)}
    print(f"{'variant':<34}{'ndcg@10':>10}{'mrr@10':>10}{'recall@100':>12}")
    for name, (q, d, kq) in variants.items():
        scores, idx = search(sparse(q, queries.dense, kq), sparse(d, docs.dense, k), "bow", k=100)
        m = metrics(data.qrels, run_from_ranking(data, scores, idx))
        print(f"{name:<34}{m['ndcg@10']:>10.4f}{m['mrr@10']:>10.4f}{m['recall@100']:>12.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
