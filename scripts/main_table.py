"""The main job's final table: the reports `dupmae eval --out` wrote, one row per (model, mode), with a caption.

    python scripts/main_table.py LABEL=REPORT.json [LABEL=REPORT.json ...]

A label is what the row is ("fine-tuned DupMAE"); each report contributes its rows (dense, bow, hybrid, bm25),
BM25 once. Every report must be on the same queries and documents, or the table says which differs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

METRICS = ("ndcg@10", "mrr@10", "recall@100")


def main(argv: list[str]) -> int:
    rows, bm25, scope = [], None, None
    for arg in argv:
        label, _, path = arg.partition("=")
        report = json.loads(Path(path).read_text(encoding="utf-8"))
        this = (report["data"], report["split"], report["documents"], report["queries"])
        if scope is not None and this != scope:
            print(f"note: {path} is on {this}, the first report on {scope}", file=sys.stderr)
        scope = scope or this
        for mode, row in report["rows"].items():
            if mode == "bm25":
                bm25 = bm25 or row
            else:
                rows.append((f"{label}, {mode}", row))
    if bm25:
        rows.append(("BM25 (bm25s, English stemmer + stopwords)", bm25))
    data, split, docs, queries = scope
    print(f"\nRetrieval on {Path(data).name}/{split}: {queries:,} queries, {docs:,} documents (see data/wordnet/README.md)")
    width = max(len(r[0]) for r in rows) + 2
    head = f"{'':<{width}}" + "".join(f"{m:>12}" for m in METRICS)
    print(head)
    print("-" * len(head))
    for name, row in rows:
        print(f"{name:<{width}}" + "".join(f"{row[m]:>12.4f}" for m in METRICS))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
