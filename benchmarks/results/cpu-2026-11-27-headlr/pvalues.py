"""p-values for the CPU runs of shipped_hybrid_long_apart_headlr (seed 1, seed 2, and their per-query mean) against the GPU rows' seed-averaged
per-query NDCG@10 (three H200 seeds each) and the CPU bowgrad0 seeds: paired sign-flip permutation test over the
300 SciFact test claims (different machines: read them as indications).

    python benchmarks/results/cpu-2026-11-27-headlr/pvalues.py
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RES = HERE.parent
sys.path.insert(0, str(RES.parent))
from benchutil import paired_permutation_p  # noqa: E402


def per_query(paths, mode):
    runs = [json.loads(Path(p).read_text())["rows"][mode]["per_query_ndcg@10"] for p in paths]
    return {q: sum(r[q] for r in runs) / len(runs) for q in runs[0]}


gpu = RES / "gpu-2026-11-27-h200-hybridonly"
refs = {
    "st_mnrl_long (GPU, 3 seeds)": per_query([gpu / f"seed{s}/st_mnrl_long.json" for s in (1, 2, 3)], "dense"),
    "ours_dense_long (GPU, 3 seeds)": per_query([gpu / f"seed{s}/ours_dense_long.json" for s in (1, 2, 3)], "dense"),
    "shipped_hybrid_long (GPU, 3 seeds)": per_query([gpu / f"seed{s}/shipped_hybrid_long.json" for s in (1, 2, 3)],
                                                    "hybrid"),
    "shipped_hybrid_long_bowgrad0 (CPU, 2 seeds)": per_query(
        [RES / "cpu-2026-11-27-bowgrad0" / f for f in ("shipped_hybrid_long_bowgrad0.json",
                                                        "shipped_hybrid_long_bowgrad0-seed2.json")], "hybrid"),
}
runs = {"seed 1": [HERE / "shipped_hybrid_long_apart_headlr.json"],
        "seed 2": [HERE / "shipped_hybrid_long_apart_headlr-seed2.json"]}
runs["seeds 1-2"] = runs["seed 1"] + runs["seed 2"]
for label, paths in runs.items():
    ours = per_query(paths, "hybrid")
    qids = sorted(ours)
    mean = sum(ours.values()) / len(qids)
    for name, ref in refs.items():
        p = paired_permutation_p([ours[q] for q in qids], [ref[q] for q in qids])
        print(f"apart_headlr (CPU, {label}) {mean:.4f} vs {name} {sum(ref.values()) / len(ref):.4f}: p = {p:.3g}")
