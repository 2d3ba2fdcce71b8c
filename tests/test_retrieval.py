"""The retrieval side: DupMAEEncoder against full-logits definitions, exact search against brute force,
the embedding cache, BEIR loading with its error reports, the metrics, BM25 and `dupmae eval`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dupmae.engine.encoder import DupMAEEncoder, Encoded
from dupmae.engine.evaluate import EvalError, evaluate, load_beir, metrics
from dupmae.engine.retrieval import cached_encode, search

BIN = Path(sys.executable).parent
TEXTS = ["the termination of something by causing so much damage to it", "a small bird",
         "an act of debating a question of law", "birds of prey hunt small mammals and other birds",
         "", "law law law"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BertForMaskedLM (seeded) with the default tokenizer, as a plain HF folder."""
    from transformers import BertConfig, BertForMaskedLM

    from dupmae.data_pipeline.tokenizer import load_fast_tokenizer, resolve_tokenizer_path

    torch.manual_seed(3)
    lm = BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=64))
    with torch.no_grad():  # a non-zero bias, so a lost bias would show
        lm.cls.predictions.bias.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("models") / "tiny"
    lm.save_pretrained(str(folder))
    load_fast_tokenizer(str(resolve_tokenizer_path(None))).save_pretrained(str(folder))
    (folder / "dupmae.json").write_text(json.dumps({"representation": {"bow_top_k": 16, "max_length": 24}}))
    return folder


def full_logits_reference(encoder: DupMAEEncoder, texts: list[str]):
    """The definition: full B x L x V MLM logits, max over positions 1..len-1; the [CLS] state."""
    enc = encoder.tokenizer(texts, padding=True, truncation=True, max_length=encoder.rep.max_length, return_tensors="pt")
    with torch.no_grad():
        out = encoder.lm(**enc, output_hidden_states=True)
    valid = enc["attention_mask"].bool().clone()
    valid[:, 0] = False
    mu = out.logits.masked_fill(~valid[:, :, None], float("-inf")).amax(1)
    return out.hidden_states[-1][:, 0].numpy(), mu.numpy()


def test_encoder_matches_full_logits(tiny_model):
    encoder = DupMAEEncoder.from_pretrained(tiny_model, device="cpu")
    assert encoder.rep.bow_top_k == 16 and encoder.rep.max_length == 24
    texts = [t for t in TEXTS if t]
    dense_ref, mu_ref = full_logits_reference(encoder, texts)
    docs = encoder.encode(texts, batch_size=2, kind="document")
    np.testing.assert_allclose(docs.dense, dense_ref, rtol=1e-4, atol=1e-5)
    top_ref = np.argsort(-mu_ref, axis=1, kind="stable")[:, :16]
    for i in range(len(texts)):  # the kept ids are the 16 largest entries of mu, with mu's values
        np.testing.assert_allclose(docs.bow_values[i], mu_ref[i, docs.bow_ids[i]], rtol=1e-4, atol=1e-5)
        assert set(docs.bow_ids[i]) == set(top_ref[i])
    queries = encoder.encode(texts, batch_size=3, kind="query")  # query_top_k 0: all of mu
    assert queries.full and queries.bow_values.shape == (len(texts), 30522)
    np.testing.assert_allclose(queries.bow_values, mu_ref, rtol=1e-4, atol=1e-4)
    # the batching (sorted by length) does not change any vector or the output order
    one = encoder.encode(texts, batch_size=1, kind="document")
    np.testing.assert_allclose(one.dense, docs.dense, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(one.bow_values, docs.bow_values, rtol=1e-4, atol=1e-5)


def test_encoder_settings_and_mean_pooling(tiny_model):
    encoder = DupMAEEncoder.from_pretrained(tiny_model, device="cpu", dense="mean", bow_top_k=5)
    enc = encoder.tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = encoder.lm.bert(**enc).last_hidden_state
    m = enc["attention_mask"][:, :, None].float()
    got = encoder.encode(TEXTS[:2])
    np.testing.assert_allclose(got.dense, ((h * m).sum(1) / m.sum(1)).numpy(), rtol=1e-4, atol=1e-5)
    assert got.bow_ids.shape == (2, 5)
    unit = DupMAEEncoder.from_pretrained(tiny_model, device="cpu", dense="mean", normalize=True).encode(TEXTS[:2])
    np.testing.assert_allclose(unit.dense, got.dense / np.linalg.norm(got.dense, axis=1, keepdims=True),
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="dense"):
        DupMAEEncoder.from_pretrained(tiny_model, device="cpu", dense="max")


def random_encoded(rng, n, d=8, vocab=50, k=6, full=False) -> Encoded:
    dense = rng.standard_normal((n, d)).astype(np.float32)
    if full:
        return Encoded(dense, np.zeros((n, 0), np.int32), rng.standard_normal((n, vocab)).astype(np.float32), vocab)
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]).astype(np.int32)
    return Encoded(dense, ids, rng.standard_normal((n, k)).astype(np.float32), vocab)


def brute_force(q: Encoded, d: Encoded, mode: str, w: float) -> np.ndarray:
    def full(e):
        if e.full:
            return e.bow_values
        m = np.zeros((len(e), e.vocab_size), np.float32)
        np.put_along_axis(m, e.bow_ids.astype(np.int64), e.bow_values, axis=1)
        return m

    dense = q.dense @ d.dense.T
    bow = full(q) @ full(d).T
    return {"dense": dense, "bow": bow, "hybrid": dense + w * bow}[mode]


@pytest.mark.parametrize("mode", ["dense", "bow", "hybrid"])
@pytest.mark.parametrize("full_queries", [False, True])
def test_search_is_exact(mode, full_queries):
    rng = np.random.default_rng(7)
    docs, queries = random_encoded(rng, 300), random_encoded(rng, 37, full=full_queries)
    kept = (docs.bow_ids.copy(), docs.bow_values.copy(), queries.bow_values.copy())
    scores, idx = search(queries, docs, mode, k=20, bow_weight=0.7, block=8)
    for a, b in zip(kept, (docs.bow_ids, docs.bow_values, queries.bow_values)):  # inputs left as they were
        np.testing.assert_array_equal(a, b)
    ref = brute_force(queries, docs, mode, 0.7)
    assert scores.shape == idx.shape == (37, 20)
    for qi in range(37):
        expect = np.lexsort((np.arange(300), -ref[qi]))[:20]
        np.testing.assert_allclose(scores[qi], ref[qi][expect], rtol=1e-5, atol=1e-5)
        # the same documents (exact search), ranks allowing for float ties at the cut
        assert len(set(idx[qi]) ^ set(expect)) <= 2
    # more than the corpus: every document, once
    _, all_idx = search(queries, docs, mode, k=1000)
    assert all_idx.shape == (37, 300) and all(len(set(r)) == 300 for r in all_idx)


def test_dense_search_without_faiss_is_the_same_search(monkeypatch):
    """faiss comes with the `eval` extra; without it dense search runs as numpy blocks, with the same results."""
    import builtins

    pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    docs, queries = random_encoded(rng, 300), random_encoded(rng, 37)
    docs.dense[5] = docs.dense[9]  # a tie, broken by corpus order in both paths
    with_faiss = search(queries, docs, "dense", k=20)
    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    without = search(queries, docs, "dense", k=20, block=8)
    np.testing.assert_array_equal(without[1], with_faiss[1])
    np.testing.assert_allclose(without[0], with_faiss[0], rtol=1e-5, atol=1e-5)


def test_search_breaks_ties_by_corpus_order():
    e = Encoded(np.ones((5, 4), np.float32), np.zeros((5, 1), np.int32), np.ones((5, 1), np.float32), 10)
    q = Encoded(np.ones((2, 4), np.float32), np.zeros((2, 1), np.int32), np.ones((2, 1), np.float32), 10)
    for mode in ("dense", "bow", "hybrid"):
        _, idx = search(q, e, mode, k=5)
        assert idx.tolist() == [[0, 1, 2, 3, 4]] * 2, mode


def test_embedding_cache(tiny_model, tmp_path, monkeypatch):
    encoder = DupMAEEncoder.from_pretrained(tiny_model, device="cpu")
    first = cached_encode(encoder, TEXTS, "document", tmp_path)
    assert len(list(tmp_path.glob("document-*.npz"))) == 1
    monkeypatch.setattr(encoder, "encode", lambda *a, **k: pytest.fail("should come from the cache"))
    again = cached_encode(encoder, TEXTS, "document", tmp_path)
    np.testing.assert_array_equal(again.dense, first.dense)
    np.testing.assert_array_equal(again.bow_ids, first.bow_ids)
    monkeypatch.undo()
    # another text, another kind, another setting: a miss each
    cached_encode(encoder, TEXTS[:-1] + ["law"], "document", tmp_path)
    cached_encode(encoder, TEXTS, "query", tmp_path)
    encoder.rep.bow_top_k = 4
    assert cached_encode(encoder, TEXTS, "document", tmp_path).bow_ids.shape[1] == 4
    assert len(list(tmp_path.glob("*.npz"))) == 4
    # a damaged cache file is re-made, not trusted
    for p in tmp_path.glob("*.npz"):
        p.write_bytes(b"garbage")
    assert cached_encode(encoder, TEXTS, "document", tmp_path).bow_ids.shape[1] == 4


# -- BEIR files ----------------------------------------------------------------------------------------

def write_beir(folder: Path, corpus, queries, qrels_lines, split="test") -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in queries))
    (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(l + "\n" for l in qrels_lines))
    return folder


CORPUS = [{"_id": "d1", "title": "Birds", "text": "small birds sing in the morning"},
          {"_id": "d2", "title": "", "text": "the court debated the question of law"},
          {"_id": "d3", "text": "destruction of a building by fire"},
          {"_id": "d4", "title": "Empty", "text": ""}]
QUERIES = [{"_id": "q1", "text": "which birds sing"}, {"_id": "q2", "text": "a question of law"},
           {"_id": "q3", "text": "unjudged query"}]
QRELS = ["q1\td1\t1", "q2\td2\t2", "q2\td3\t0"]


def test_load_beir_reads_the_layout(tmp_path):
    data = load_beir(write_beir(tmp_path, CORPUS, QUERIES, QRELS))
    assert data.corpus_ids == ["d1", "d2", "d3", "d4"]
    assert data.corpus_texts[0] == "Birds small birds sing in the morning" and data.corpus_texts[3] == "Empty"
    assert data.query_ids == ["q1", "q2"]  # q3 has no judgment: not evaluated
    assert data.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2, "d3": 0}}


@pytest.mark.parametrize("corpus, queries, qrels, message", [
    (CORPUS, QUERIES, QRELS + ["q1\td9\t1"], r"qrels/test.tsv:5: corpus id 'd9' is not in corpus.jsonl"),
    (CORPUS, QUERIES, QRELS + ["q7\td1\t1"], r"qrels/test.tsv:5: query id 'q7' is not in queries.jsonl"),
    (CORPUS, QUERIES + [{"_id": "q4", "text": "  "}], QRELS, r"queries.jsonl:4: query 'q4' has an empty text"),
    (CORPUS + ["{not json"], QUERIES, QRELS, r"corpus.jsonl:5: not valid JSON"),
    (CORPUS + [{"_id": "d1", "text": "again"}], QUERIES, QRELS, r"corpus.jsonl:5: duplicate document id 'd1' "
                                                                r"\(first on line 1\)"),
    (CORPUS + [{"text": "no id"}], QUERIES, QRELS, r"corpus.jsonl:5: no \"_id\""),
    (CORPUS, QUERIES, QRELS + ["q1\td2\tyes"], r"qrels/test.tsv:5: score 'yes' is not an integer"),
    (CORPUS, QUERIES, QRELS + ["q1 d2 1"], r"qrels/test.tsv:5: expected 3 tab-separated fields"),
])
def test_load_beir_reports_inconsistent_files(tmp_path, corpus, queries, qrels, message):
    folder = write_beir(tmp_path, corpus, queries, qrels)
    with pytest.raises(EvalError, match=message) as info:
        load_beir(folder)
    assert "--skip-invalid" in str(info.value)
    notes = []
    data = load_beir(folder, skip_invalid=True, log=notes.append)  # left out, with the same report
    assert data.query_ids == ["q1", "q2"] and any("leaving out 1" in n for n in notes)


def test_load_beir_missing_files(tmp_path):
    write_beir(tmp_path, CORPUS, QUERIES, QRELS)
    with pytest.raises(EvalError, match=r"qrels/dev.tsv: missing .*splits here: test"):
        load_beir(tmp_path, split="dev")
    (tmp_path / "queries.jsonl").unlink()
    with pytest.raises(EvalError, match="queries.jsonl: missing"):
        load_beir(tmp_path)


def test_metrics_on_known_rankings():
    qrels = {"a": {"x": 1}, "b": {"y": 1, "z": 1}}
    perfect = {"a": {"x": 3.0, "n": 1.0}, "b": {"y": 3.0, "z": 2.0, "n": 1.0}}
    assert metrics(qrels, perfect) == {"ndcg@10": 1.0, "mrr@10": 1.0, "recall@100": 1.0}
    # a: the relevant document second -> RR 1/2, nDCG 1/log2(3); b: nothing relevant retrieved -> 0
    second = {"a": {"n": 3.0, "x": 2.0}, "b": {"n": 1.0}}
    got = metrics(qrels, second)
    assert got["mrr@10"] == pytest.approx(0.25)
    assert got["ndcg@10"] == pytest.approx((1 / np.log2(3)) / 2)
    assert got["recall@100"] == pytest.approx(0.5)
    # MRR@10 is cut at 10: a relevant document at rank 11 counts 0
    late = {"a": {**{f"n{i}": 100.0 - i for i in range(10)}, "x": 1.0}}
    assert metrics({"a": {"x": 1}}, late)["mrr@10"] == 0.0
    # per query: every judged query's values, whose means are the row
    each = {}
    assert metrics(qrels, second, each) == got
    assert each["a"] == pytest.approx({"ndcg@10": 1 / np.log2(3), "mrr@10": 0.5, "recall@100": 1.0})
    assert each["b"] == {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@100": 0.0}


def test_evaluate_rows_and_bm25(tmp_path, tiny_model):
    folder = write_beir(tmp_path / "beir", CORPUS, QUERIES, QRELS)
    report = evaluate(tiny_model, folder, cache_dir=None, progress=False)
    assert set(report["rows"]) == {"dense", "bow", "hybrid", "bm25"}
    for row in report["rows"].values():
        assert set(row) == {"ndcg@10", "mrr@10", "recall@100"} and all(0 <= v <= 1 for v in row.values())
    # BM25 finds both judged documents first: the query words occur in them and nowhere else
    assert report["rows"]["bm25"] == {"ndcg@10": 1.0, "mrr@10": 1.0, "recall@100": 1.0}
    assert report["documents"] == 4 and report["queries"] == 2 and report["judgments"] == 3


def test_eval_cli_prints_the_table_and_writes_the_report(tmp_path, tiny_model):
    folder = write_beir(tmp_path / "beir", CORPUS, QUERIES, QRELS)
    out = tmp_path / "report.json"
    proc = subprocess.run([str(BIN / "dupmae"), "eval", "--model", str(tiny_model), "--data", str(folder),
                           "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    for name in ("dense", "bow", "hybrid", "bm25", "ndcg@10", "mrr@10", "recall@100"):
        assert name in table
    report = json.loads(out.read_text())
    assert report["rows"]["bm25"]["ndcg@10"] == 1.0 and report["model"]["bow_top_k"] == 16
    # a bad file: exit 2 and the file:line on stderr, within seconds
    write_beir(tmp_path / "bad", CORPUS, QUERIES, QRELS + ["q1\tmissing\t1"])
    proc = subprocess.run([str(BIN / "dupmae"), "eval", "--bm25-only", "--data", str(tmp_path / "bad")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "test.tsv:5: corpus id 'missing'" in proc.stderr
    proc = subprocess.run([str(BIN / "dupmae"), "eval", "--model", str(tiny_model), "--data", str(folder),
                           "--modes", "dense,sparse"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown sparse" in proc.stderr


def test_subsample_keeps_every_judged_document(tmp_path):
    from dupmae.engine.evaluate import subsample

    corpus = [{"_id": f"d{i}", "text": f"document number {i}"} for i in range(50)]
    queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(10)]
    qrels = [f"q{i}\td{5 * i}\t1" for i in range(10)]
    data = load_beir(write_beir(tmp_path, corpus, queries, qrels))
    small = subsample(data, max_queries=4, max_documents=12)
    assert small.query_ids == ["q0", "q1", "q2", "q3"] and set(small.qrels) == set(small.query_ids)
    assert len(small.corpus_ids) == 12 and {"d0", "d5", "d10", "d15"} <= set(small.corpus_ids)
    assert small.corpus_ids == [d for d in data.corpus_ids if d in set(small.corpus_ids)]  # corpus order
    assert subsample(data, 4, 12).corpus_ids == small.corpus_ids  # seeded: the same sample every time
    assert subsample(data, None, 1000).corpus_ids == data.corpus_ids
