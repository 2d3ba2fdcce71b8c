"""benchmarks/finetune_seeds.py: several seeds of bench_finetune stages in one table (mean, spread, paired tests)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import finetune_seeds  # noqa: E402

QIDS = [str(i) for i in range(40)]


def write_stage(folder: Path, name: str, per_query: dict[str, dict[str, float]], mode: str, machine="m1"):
    folder.mkdir(parents=True, exist_ok=True)
    rows = {m: {"ndcg@10": sum(pq.values()) / len(pq), "recall@100": 0.9, "per_query_ndcg@10": pq}
            for m, pq in per_query.items()}
    (folder / f"{name}.json").write_text(json.dumps({"stage": name, "system": f"system {name}", "mode": mode,
                                                     "rows": rows, "machine": machine}))


def test_mean_spread_and_paired_tests(tmp_path):
    strong = {q: 0.9 for q in QIDS}
    weak = {q: 0.1 for q in QIDS}
    for seed, shift in ((1, 0.0), (2, 0.02)):
        folder = tmp_path / f"seed{seed}"
        write_stage(folder, "ref", {"dense": {q: v - shift for q, v in weak.items()}}, "dense")
        write_stage(folder, "better", {"hybrid": strong, "bow": weak}, "hybrid")
    # a stage written before per-query values were kept is left out rather than miscounted
    (tmp_path / "seed1" / "old.json").write_text(json.dumps({"stage": "old", "system": "old", "mode": "dense",
                                                             "rows": {"dense": {"ndcg@10": 0.5, "recall@100": 0.9}}}))
    stages = finetune_seeds.load([tmp_path / "seed1", tmp_path / "seed2"])
    assert sorted(stages) == ["better", "ref"] and len(stages["ref"]) == 2
    bm25 = ({"ndcg@10": 0.1, "recall@100": 0.8}, dict(weak))
    text = finetune_seeds.table(stages, "ref", bm25)
    lines = {tuple(c.strip() for c in line.split("|")[1:4]): line for line in text.splitlines() if line.startswith("| ")}
    ref = lines[("ref", "system ref", "dense")]
    assert "| 2 | 0.090 ± 0.010 |" in ref  # mean and population sd of 0.1 and 0.08
    hybrid = lines[("better", "system better", "hybrid")]
    # every query better than BM25 and than the reference: the smallest p the permutation test can give
    p_bm25, p_ref = (float(c) for c in hybrid.rstrip(" |").split("|")[-2:])
    assert p_bm25 < 1e-3 and p_ref < 1e-3
    bow = lines[("better", "system better", "bow")]
    assert float(bow.rstrip(" |").split("|")[-2]) == 1.0  # identical to BM25 query by query: no difference


def test_unknown_reference_and_missing_folder(tmp_path):
    write_stage(tmp_path / "s1", "ref", {"dense": {q: 0.5 for q in QIDS}}, "dense")
    stages = finetune_seeds.load([tmp_path / "s1"])
    with pytest.raises(SystemExit, match="--reference nope"):
        finetune_seeds.table(stages, "nope", ({"ndcg@10": 0.1, "recall@100": 0.8}, {q: 0.1 for q in QIDS}))
    with pytest.raises(SystemExit, match="not a folder"):
        finetune_seeds.load([tmp_path / "absent"])
