# Run from the repository root: python benchmarks/results/cpu-2026-11-27-perquery/perquery.py (needs work/bench-finetune
# from bench_finetune.py: the st_mnrl_long model and the shipped_hybrid_long(_hybridonly) exports). Output: perquery.log
"""Per-query NDCG@10 for the CPU rows saved before stage JSONs kept them: sentence-transformers' st_mnrl_long model
(evaluated as st_baseline.py does) and the shipped_hybrid_long export; then paired sign-flip p-values."""
import json, sys, time
from pathlib import Path
import numpy as np
REPO = Path(__file__).resolve().parents[3]; W = REPO / "work" / "bench-finetune"; SCIFACT = REPO.parent / "shared" / "data" / "scifact"
sys.path.insert(0, str(REPO / "benchmarks"))
import benchutil
from dupmae.engine.encoder import Encoded
from dupmae.engine.evaluate import load_beir, metrics, run_from_ranking, evaluate
from dupmae.engine.retrieval import search
out = W / "perquery" / "perquery.json"
res = json.loads(out.read_text()) if out.exists() else {}
test = load_beir(SCIFACT, "test")
if "st_mnrl_long" not in res:
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(str(W / "st_mnrl_long" / "model"), device="cpu")
    model.max_seq_length = 160
    kw = dict(batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    docs = model.encode(test.corpus_texts, **kw); queries = model.encode(test.query_texts, **kw)
    empty = np.zeros((0, 0), np.float32)
    enc = lambda x: Encoded(x.astype(np.float32), np.zeros((len(x), 0), np.int32), empty.reshape(len(x), 0), 1)
    s, i = search(enc(queries), enc(docs), "dense", k=100)
    pq = {}
    row = metrics(test.qrels, run_from_ranking(test, s, i), per_query=pq)
    res["st_mnrl_long"] = {"ndcg@10": row["ndcg@10"], "pq": {q: m["ndcg@10"] for q, m in pq.items()}}
    out.write_text(json.dumps(res)); print("st", row["ndcg@10"], flush=True)
if "shipped_hybrid_long" not in res:
    rep = evaluate(str(W / "shipped_hybrid_long.export"), SCIFACT, "test", modes=("hybrid",), bm25=False,
                   cache_dir=W / "cache", progress=False, per_query=True)
    res["shipped_hybrid_long"] = {"ndcg@10": rep["rows"]["hybrid"]["ndcg@10"],
                                  "pq": {q: m["ndcg@10"] for q, m in rep["per_query"]["hybrid"].items()}}
    out.write_text(json.dumps(res)); print("shipped", res["shipped_hybrid_long"]["ndcg@10"], flush=True)
ho = json.loads((W / "shipped_hybrid_long_hybridonly.json").read_text())["rows"]["hybrid"]["per_query_ndcg@10"]
for ref in ("st_mnrl_long", "shipped_hybrid_long"):
    pq = res[ref]["pq"]; qs = sorted(ho)
    assert sorted(pq) == qs, ref
    a = [ho[q] for q in qs]; b = [pq[q] for q in qs]
    print(f"hybridonly {np.mean(a):.4f} vs {ref} {np.mean(b):.4f}: p = {benchutil.paired_permutation_p(a, b):.3g}")
