"""Several seeds of bench_finetune.py stages in one table: mean ± spread over seeds and paired tests over queries.

    python benchmarks/finetune_seeds.py work/bench-finetune-gpu/seed1 work/bench-finetune-gpu/seed2 \\
        work/bench-finetune-gpu/seed3 --reference st_mnrl_long --out benchmarks/results/finetune_gpu.md

Each folder is one seed's `bench_finetune.py --work` folder (`--seed N`); a stage counts where its JSON keeps the
per-query NDCG@10 (`per_query_ndcg@10`, written since bench_finetune kept it). For every stage and scored mode:
NDCG@10 and Recall@100 as mean ± standard deviation over seeds, and two p-values of a sign-flip permutation test
on the seed-averaged per-query NDCG@10: against BM25 (bm25s on the same test queries, computed here) and against
the `--reference` stage's own mode.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402

SCIFACT = benchutil.REPO.parent / "shared" / "data" / "scifact"


def load(folders: list[Path]) -> dict[str, list[dict]]:
    """stage -> its records, one per seed folder that has it with per-query values."""
    stages: dict[str, list[dict]] = {}
    for folder in folders:
        if not folder.is_dir():
            raise SystemExit(f"{folder}: not a folder")
        for path in sorted(folder.glob("*.json")):
            rec = json.loads(path.read_text())
            rows = rec.get("rows") or {}
            if rows and all("per_query_ndcg@10" in r for r in rows.values()):
                stages.setdefault(rec.get("stage", path.stem), []).append(rec)
    return stages


def bm25_per_query(data: Path) -> tuple[dict, dict]:
    from dupmae.engine.evaluate import bm25_search, load_beir, metrics, run_from_ranking

    test = load_beir(data, "test")
    s, i = bm25_search(test)
    pq: dict = {}
    row = metrics(test.qrels, run_from_ranking(test, s, i), per_query=pq)
    return row, {q: m["ndcg@10"] for q, m in pq.items()}


def table(stages: dict[str, list[dict]], reference: str | None, bm25: tuple[dict, dict]) -> str:
    import numpy as np

    def mean_pq(recs, mode):
        qids = sorted(recs[0]["rows"][mode]["per_query_ndcg@10"])
        return qids, np.mean([[r["rows"][mode]["per_query_ndcg@10"][q] for q in qids] for r in recs], axis=0)

    bm25_row, bm25_pq = bm25
    ref = None
    if reference:
        if reference not in stages:
            raise SystemExit(f"--reference {reference}: no such stage with per-query values in the folders")
        rrec = stages[reference]
        ref = mean_pq(rrec, rrec[0]["mode"])
    machines = sorted({r.get("machine", "?") for recs in stages.values() for r in recs})
    lines = [f"SciFact test (300 queries); {', '.join(machines)}. Mean ± standard deviation over seeds (n); p: "
             "sign-flip permutation test over queries on the seed-averaged per-query NDCG@10.", "",
             f"| stage | system | scored | n | NDCG@10 | Recall@100 | p vs BM25 | p vs {reference or '-'} |",
             "|---|---|---|---:|---:|---:|---:|---:|",
             f"| bm25 | BM25 (bm25s) | lexical | 1 | {bm25_row['ndcg@10']:.3f} | {bm25_row['recall@100']:.3f} | | |"]
    for name, recs in stages.items():
        for mode in recs[0]["rows"]:
            nd = [r["rows"][mode]["ndcg@10"] for r in recs]
            rc = [r["rows"][mode]["recall@100"] for r in recs]
            qids, pq = mean_pq(recs, mode)
            p_bm25 = benchutil.paired_permutation_p(pq, [bm25_pq[q] for q in qids])
            p_ref = ""
            if ref is not None and name != reference:
                ref_pq = dict(zip(*ref))
                p_ref = f"{benchutil.paired_permutation_p(pq, [ref_pq[q] for q in qids]):.3g}"
            lines.append(f"| {name} | {recs[0]['system']} | {mode} | {len(recs)} | {np.mean(nd):.3f} ± "
                         f"{np.std(nd):.3f} | {np.mean(rc):.3f} ± {np.std(rc):.3f} | {p_bm25:.3g} | {p_ref} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="one bench_finetune --work folder per seed")
    ap.add_argument("--reference", help="the stage every row is tested against (e.g. st_mnrl_long)")
    ap.add_argument("--data", type=Path, default=SCIFACT, help=f"the SciFact folder (default {SCIFACT})")
    ap.add_argument("--out", type=Path, help="write the markdown table here too")
    args = ap.parse_args()
    stages = load(args.folders)
    if not stages:
        raise SystemExit("no stage with per-query NDCG@10 in " + ", ".join(map(str, args.folders)))
    text = table(stages, args.reference, bm25_per_query(args.data))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
