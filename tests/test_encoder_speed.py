"""DupMAEEncoder on the shared representation (engine/representation.py): token-length batching gives the
vectors of a straightforward one-text-at-a-time encoding, in the input order; `modes` computes only what is
asked for (dense only never touches the MLM head); W_cls from dense_projection.safetensors; the cache key
covers the parts and the projection file; `dupmae eval --modes dense` encodes dense only."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dupmae.engine.encoder import DupMAEEncoder, Encoded, parts_for
from dupmae.engine.representation import PROJECTION_FILE
from dupmae.engine.retrieval import cached_encode, model_fingerprint, search

TEXTS = ["the termination of something by causing so much damage to it", "a small bird", "",
         "an act of debating a question of law", "birds of prey hunt small mammals and other birds " * 6,
         "law law law", "x", "a tangible and visible entity; an entity that can cast a shadow",
         "something that is remembered", "a small bird"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BertForMaskedLM (seeded, non-zero head bias) with the default tokenizer."""
    from transformers import BertConfig, BertForMaskedLM

    from dupmae.data_pipeline.tokenizer import load_fast_tokenizer, resolve_tokenizer_path

    torch.manual_seed(5)
    lm = BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=64))
    with torch.no_grad():
        lm.cls.predictions.bias.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("models") / "tiny"
    lm.save_pretrained(str(folder))
    load_fast_tokenizer(str(resolve_tokenizer_path(None))).save_pretrained(str(folder))
    (folder / "dupmae.json").write_text(json.dumps({"representation": {"bow_top_k": 16, "max_length": 40}}))
    return folder


def one_by_one(encoder: DupMAEEncoder, texts, kind):
    """The straightforward encoding: each text alone (no padding at all), full logits, the [CLS] state."""
    lm = encoder.lm
    dense, mus = [], []
    w = encoder.retriever.w_cls
    for t in texts:
        enc = encoder.tokenizer([t], truncation=True, max_length=encoder.rep.max_length, return_tensors="pt")
        with torch.no_grad():
            out = lm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
            h = out.hidden_states[-1][0]
            d = h[0] if encoder.rep.dense == "cls" else h.mean(0)
            if w is not None:
                d = w(d)
            if encoder.rep.normalize:
                d = torch.nn.functional.normalize(d, dim=-1)
        dense.append(d.numpy())
        mus.append(out.logits[0, 1:].amax(0).numpy())  # positions 1..len-1
    mu = np.stack(mus)
    k = encoder.rep.bow_top_k if kind == "document" else encoder.rep.query_top_k
    return np.stack(dense), mu, k


def check_against_reference(got: Encoded, dense, mu, k):
    np.testing.assert_allclose(got.dense, dense, rtol=1e-5, atol=1e-5)
    if not k:
        assert got.full
        np.testing.assert_allclose(got.bow_values, mu, rtol=1e-5, atol=1e-5)
        return
    assert got.bow_ids.shape == got.bow_values.shape == (len(mu), k)
    for i in range(len(mu)):
        np.testing.assert_allclose(got.bow_values[i], mu[i, got.bow_ids[i]], rtol=1e-5, atol=1e-5)
        kth = np.sort(mu[i])[::-1][k - 1]
        assert (mu[i, got.bow_ids[i]] >= kth - 1e-5).all()  # the k largest entries


@pytest.mark.parametrize("kind", ["document", "query"])
@pytest.mark.parametrize("pad", [1, 8])
def test_token_length_batching_matches_one_text_at_a_time(tiny_model, kind, pad):
    encoder = DupMAEEncoder.from_pretrained(tiny_model, device="cpu")
    dense, mu, k = one_by_one(encoder, TEXTS, kind)
    got = encoder.encode(TEXTS, batch_size=3, kind=kind, pad_to_multiple_of=pad)
    check_against_reference(got, dense, mu, k)
    assert got.meta["modes"] == ["dense", "bow"]
    # the same texts shuffled: the same vectors, in the new order
    perm = np.random.default_rng(0).permutation(len(TEXTS))
    again = encoder.encode([TEXTS[i] for i in perm], batch_size=4, kind=kind, pad_to_multiple_of=pad)
    np.testing.assert_allclose(again.dense, got.dense[perm], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(again.bow_values, got.bow_values[perm], rtol=1e-5, atol=1e-5)


def test_tokenize_once_and_truncate(tiny_model):
    encoder = DupMAEEncoder.from_pretrained(tiny_model, device="cpu")
    flat, offsets = encoder.tokenize(TEXTS, chunk=3)
    lengths = np.diff(offsets)
    assert len(lengths) == len(TEXTS) and lengths.max() == 40 and lengths[2] == 2  # "" -> [CLS] [SEP]
    ref = encoder.tokenizer(TEXTS, truncation=True, max_length=40)["input_ids"]
    assert [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(TEXTS))] == ref


def test_dense_only_never_projects_onto_the_vocabulary(tiny_model, monkeypatch):
    encoder = DupMAEEncoder.from_pretrained(tiny_model, device="cpu")
    full = encoder.encode(TEXTS, batch_size=4)
    import dupmae.kernels as kernels

    def boom(*a, **k):
        raise AssertionError("the MLM head ran for a dense-only encoding")

    monkeypatch.setattr(kernels, "bow_max_pool", boom)
    monkeypatch.setattr(encoder.retriever, "_head", boom)
    dense = encoder.encode(TEXTS, batch_size=4, modes=("dense",))
    np.testing.assert_allclose(dense.dense, full.dense, rtol=1e-5, atol=1e-5)
    assert dense.bow_ids.shape == (len(TEXTS), 0) and dense.bow_values.shape == (len(TEXTS), 0)
    assert not dense.has_bow and not dense.full and dense.has_dense
    scores, idx = search(dense, dense, "dense", k=3)
    assert idx.shape == (len(TEXTS), 3)
    for mode in ("bow", "hybrid"):
        with pytest.raises(ValueError, match="without their BoW part.*modes including 'bow'"):
            search(dense, dense, mode)
    monkeypatch.undo()
    bow = encoder.encode(TEXTS, batch_size=4, modes=("bow",))
    assert bow.dense.shape == (len(TEXTS), 0)
    np.testing.assert_allclose(bow.bow_values, full.bow_values, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="without their dense part"):
        search(bow, bow, "hybrid")
    assert parts_for(["hybrid"]) == ("dense", "bow") and parts_for("bow") == ("bow",)
    with pytest.raises(ValueError, match="unknown 'sparse'"):
        encoder.encode(TEXTS, modes=("sparse",))


def test_projection_file_is_served_and_keys_the_cache(tiny_model, tmp_path):
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "ft"
    shutil.copytree(tiny_model, folder)
    torch.manual_seed(1)
    w = torch.randn(12, 32)
    save_file({"weight": w}, str(folder / PROJECTION_FILE))
    settings = json.loads((folder / "dupmae.json").read_text())
    settings["representation"]["dense_dim"] = 12
    (folder / "dupmae.json").write_text(json.dumps(settings))
    encoder = DupMAEEncoder.from_pretrained(folder, device="cpu")
    assert encoder.describe()["dense_projection"] is True and encoder.describe()["dense_dim"] == 12
    dense, mu, k = one_by_one(encoder, TEXTS, "document")
    got = encoder.encode(TEXTS, batch_size=4)
    assert got.dense.shape == (len(TEXTS), 12)
    check_against_reference(got, dense, mu, k)
    plain = DupMAEEncoder.from_pretrained(tiny_model, device="cpu").encode(TEXTS, modes=("dense",))
    np.testing.assert_allclose(got.dense, plain.dense @ w.numpy().T, rtol=1e-4, atol=1e-5)  # W_cls h_[CLS]

    cache = tmp_path / "cache"
    first = cached_encode(encoder, TEXTS, "document", cache, modes=("dense",))
    assert first.bow_values.shape[1] == 0 and len(list(cache.glob("*.npz"))) == 1
    cached_encode(encoder, TEXTS, "document", cache)  # both parts: another key
    assert len(list(cache.glob("*.npz"))) == 2
    before = model_fingerprint(folder)
    time.sleep(0.01)
    save_file({"weight": 2 * w}, str(folder / PROJECTION_FILE))  # a new W_cls: a new fingerprint, a miss
    os.utime(folder / PROJECTION_FILE)
    assert model_fingerprint(folder) != before
    changed = DupMAEEncoder.from_pretrained(folder, device="cpu")
    again = cached_encode(changed, TEXTS, "document", cache, modes=("dense",))
    np.testing.assert_allclose(again.dense, 2 * first.dense, rtol=1e-4, atol=1e-5)
    (folder / PROJECTION_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="12-dimensional W_cls but dense_projection.safetensors is missing"):
        DupMAEEncoder.from_pretrained(folder, device="cpu")


def test_cache_serves_one_part_from_a_file_of_both(tiny_model, tmp_path, monkeypatch):
    encoder = DupMAEEncoder.from_pretrained(tiny_model, device="cpu")
    both = cached_encode(encoder, TEXTS, "query", tmp_path)
    monkeypatch.setattr(encoder, "encode", lambda *a, **k: pytest.fail("should come from the cache"))
    dense = cached_encode(encoder, TEXTS, "query", tmp_path, modes=("dense",))
    np.testing.assert_array_equal(dense.dense, both.dense)
    assert not dense.has_bow and dense.meta["modes"] == ["dense"]


def test_evaluate_dense_only_encodes_dense_only(tiny_model, tmp_path, monkeypatch):
    from dupmae.engine import evaluate as ev

    corpus = [{"_id": "d1", "title": "Birds", "text": "small birds sing in the morning"},
              {"_id": "d2", "text": "the court debated the question of law"}]
    queries = [{"_id": "q1", "text": "which birds sing"}, {"_id": "q2", "text": "a question of law"}]
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    calls = []
    real = DupMAEEncoder.encode

    def spy(self, texts, *a, **k):
        calls.append(tuple(k.get("modes")))
        return real(self, texts, *a, **k)

    monkeypatch.setattr(DupMAEEncoder, "encode", spy)
    report = ev.evaluate(tiny_model, tmp_path, modes=("dense",), bm25=False, cache_dir=None, progress=False)
    assert set(report["rows"]) == {"dense"} and calls == [("dense",), ("dense",)]
