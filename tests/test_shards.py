"""The shard format (write_shard / Shard.open) and the sentence packing that fills it."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from dupmae.data_pipeline.packing import Packer, pack_blocks, sentence_cut_points
from dupmae.data_pipeline.readers import FieldSpec, Record
from dupmae.data_pipeline.shards import MAGIC, VERSION, Shard, ShardError, sha256_file, token_dtype, write_shard

HEADER = 40  # magic 8 + version 4 + dtype 4 + N 8 + D 8 + T 8


def _write(prefix, docs, dtype=np.uint16):
    """docs: list of documents, each a list of samples (lists of ids). Returns the flat arrays written."""
    samples = [np.asarray(s) for d in docs for s in d]
    tokens = np.concatenate(samples) if samples else np.zeros(0, dtype)
    lengths = np.array([len(s) for s in samples], dtype=np.int32)
    doc_index = np.concatenate(([0], np.cumsum([len(d) for d in docs]))).astype(np.int64)
    write_shard(prefix, tokens, lengths, doc_index, dtype)
    return tokens, lengths, doc_index


# ----------------------------------------------------------------------------------------------- round trip


def test_round_trip_uint16(tmp_path):
    prefix = tmp_path / "shard-00000"
    docs = [[[5, 6, 7], [8]], [[9, 10, 11, 12, 13]], [[1, 2], [3], [65535]]]  # 6 samples: lengths need padding
    tokens, lengths, doc_index = _write(prefix, docs)

    s = Shard.open(prefix)
    s.check_consistency()
    assert s.tokens.dtype == np.uint16
    assert s.tokens.tolist() == tokens.tolist()
    assert s.lengths.tolist() == [3, 1, 5, 2, 1, 1]
    assert s.offsets.tolist() == [0, 3, 4, 9, 11, 12]
    assert s.doc_index.tolist() == [0, 2, 3, 6]
    assert len(s) == 6
    assert [s[i].tolist() for i in range(len(s))] == [x for d in docs for x in d]
    # exact sizes of both files, and nothing temporary left behind
    assert (tmp_path / "shard-00000.bin").stat().st_size == 2 * tokens.size
    assert (tmp_path / "shard-00000.idx").stat().st_size == HEADER + 4 * 6 + 0 + 8 * 6 + 8 * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.bin", "shard-00000.idx"]


def test_round_trip_odd_sample_count_is_padded(tmp_path):
    prefix = tmp_path / "s"
    _write(prefix, [[[1, 2, 3]], [[4], [5, 6]]])  # 3 samples: 12 bytes of lengths + 4 of padding
    assert (tmp_path / "s.idx").stat().st_size == HEADER + 12 + 4 + 8 * 3 + 8 * 3
    s = Shard.open(prefix)
    s.check_consistency()
    assert s.offsets.tolist() == [0, 3, 4]
    assert [s[i].tolist() for i in range(3)] == [[1, 2, 3], [4], [5, 6]]


def test_header_fields(tmp_path):
    _write(tmp_path / "s", [[[1, 2], [3]], [[4, 5, 6]]])
    magic, version, code, n, d, t = struct.unpack("<8sIIQQQ", (tmp_path / "s.idx").read_bytes()[:HEADER])
    assert (magic, version, code, n, d, t) == (MAGIC, VERSION, 2, 3, 2, 6)


def test_token_dtype_switches_to_uint32_above_65536():
    assert token_dtype(30522) is np.uint16
    assert token_dtype(65536) is np.uint16  # ids 0..65535 still fit
    assert token_dtype(65537) is np.uint32
    assert token_dtype(250_002) is np.uint32


def test_round_trip_uint32_keeps_large_ids(tmp_path):
    vocab = 70_000
    dtype = token_dtype(vocab)
    ids = [[[65535, 65536, 69999]], [[0, 1], [66000]]]
    tokens, _, _ = _write(tmp_path / "s", ids, dtype)
    s = Shard.open(tmp_path / "s")
    s.check_consistency()
    assert s.tokens.dtype == np.uint32
    assert (tmp_path / "s.bin").stat().st_size == 4 * 6
    assert s.tokens.tolist() == [65535, 65536, 69999, 0, 1, 66000]
    assert struct.unpack_from("<I", (tmp_path / "s.idx").read_bytes(), 12)[0] == 4


def test_empty_shard(tmp_path):
    write_shard(tmp_path / "e", np.zeros(0, np.uint16), np.zeros(0, np.int32), np.zeros(1, np.int64), np.uint16)
    assert (tmp_path / "e.bin").stat().st_size == 0
    s = Shard.open(tmp_path / "e")
    s.check_consistency()
    assert len(s) == 0 and s.tokens.size == 0
    assert s.doc_index.tolist() == [0]


def test_write_rejects_lengths_that_do_not_add_up(tmp_path):
    with pytest.raises(ValueError, match="lengths do not add up"):
        write_shard(tmp_path / "s", np.arange(5), np.array([2, 2], np.int32), np.array([0, 2]), np.uint16)
    assert not (tmp_path / "s.idx").exists()


def test_sha256_file(tmp_path):
    import hashlib

    p = tmp_path / "x"
    p.write_bytes(b"abc" * 1000)
    assert sha256_file(p, chunk=7) == hashlib.sha256(b"abc" * 1000).hexdigest()


# ----------------------------------------------------------------------------------------------- damaged shards


@pytest.fixture
def shard(tmp_path):
    prefix = tmp_path / "shard-00003"
    _write(prefix, [[[1, 2, 3], [4, 5]], [[6, 7, 8, 9]]])
    return prefix


def test_truncated_bin_is_named(shard):
    bin_path = shard.with_suffix(".bin")
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    with pytest.raises(ShardError) as e:
        Shard.open(shard)
    assert str(bin_path) in str(e.value) and "truncated" in str(e.value)


def test_truncated_idx_is_named(shard):
    idx_path = shard.with_suffix(".idx")
    idx_path.write_bytes(idx_path.read_bytes()[:-8])
    with pytest.raises(ShardError) as e:
        Shard.open(shard)
    assert str(idx_path) in str(e.value) and "truncated" in str(e.value)


def test_idx_shorter_than_header_is_named(shard):
    idx_path = shard.with_suffix(".idx")
    idx_path.write_bytes(idx_path.read_bytes()[:20])
    with pytest.raises(ShardError, match="shorter than the 40-byte header") as e:
        Shard.open(shard)
    assert str(idx_path) in str(e.value)


def _patch_idx(prefix, offset, data):
    idx_path = prefix.with_suffix(".idx")
    raw = bytearray(idx_path.read_bytes())
    raw[offset : offset + len(data)] = data
    idx_path.write_bytes(bytes(raw))
    return idx_path


def test_bad_magic_is_named(shard):
    idx_path = _patch_idx(shard, 0, b"MMIDIDX\x00")
    with pytest.raises(ShardError, match="bad magic") as e:
        Shard.open(shard)
    assert str(idx_path) in str(e.value)


def test_wrong_version_is_named(shard):
    idx_path = _patch_idx(shard, 8, struct.pack("<I", VERSION + 1))
    with pytest.raises(ShardError, match=f"format version {VERSION + 1}") as e:
        Shard.open(shard)
    assert str(idx_path) in str(e.value)


def test_unknown_dtype_code_is_named(shard):
    idx_path = _patch_idx(shard, 12, struct.pack("<I", 3))
    with pytest.raises(ShardError, match="unknown token dtype code 3") as e:
        Shard.open(shard)
    assert str(idx_path) in str(e.value)


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_missing_file_is_named(shard, suffix):
    shard.with_suffix(suffix).unlink()
    with pytest.raises(ShardError, match="missing") as e:
        Shard.open(shard)
    assert str(shard.with_suffix(suffix)) in str(e.value)


def test_consistency_catches_offsets_that_do_not_follow_lengths(shard):
    # offsets start after the header, 3 lengths (12 bytes) and 4 bytes of padding
    _patch_idx(shard, HEADER + 16 + 8, struct.pack("<q", 2))  # second offset 3 -> 2
    s = Shard.open(shard)  # sizes are still right: only the structural check sees it
    with pytest.raises(ShardError, match="offsets do not follow the lengths"):
        s.check_consistency()


def test_consistency_catches_bad_document_boundaries(shard):
    doc_pos = HEADER + 16 + 24
    _patch_idx(shard, doc_pos + 16, struct.pack("<q", 2))  # last boundary 3 -> 2: sample 2 in no document
    with pytest.raises(ShardError, match="document boundaries"):
        Shard.open(shard).check_consistency()


# ----------------------------------------------------------------------------------------------- packing

END = 0  # the sentence-end token id in the synthetic tests


def _ids(sentence_lengths):
    """Synthetic ids: sentences of the given lengths, each ending with END (ids 1..9 inside)."""
    out = []
    for n in sentence_lengths:
        out.extend([7] * (n - 1) + [END])
    return np.asarray(out, dtype=np.int64)


def _blocks(ids, max_tokens):
    bounds = sentence_cut_points(ids, np.array([END]), max_tokens)
    return bounds, pack_blocks(bounds, max_tokens)


def test_cut_points_are_sentence_ends():
    ids = np.array([3, 4, END, 5, END, 6])
    assert sentence_cut_points(ids, np.array([END]), 10).tolist() == [0, 3, 5, 6]


def test_consecutive_sentences_are_packed_greedily():
    _, lengths = _blocks(_ids([3, 3, 3, 3, 3]), 7)
    assert lengths.tolist() == [6, 6, 3]
    _, lengths = _blocks(_ids([2, 2, 2, 2]), 8)
    assert lengths.tolist() == [8]  # a block of exactly max_tokens


def test_over_long_sentence_without_punctuation_is_split():
    ids = np.full(23, 7, dtype=np.int64)  # no sentence end at all
    bounds, lengths = _blocks(ids, 5)
    assert bounds.tolist() == [0, 5, 10, 15, 20, 23]
    assert lengths.tolist() == [5, 5, 5, 5, 3]


def test_long_sentence_is_cut_from_its_own_start():
    # a 2-token sentence, then a 7-token one: cuts at 2, then every 4 tokens from 2
    bounds, lengths = _blocks(_ids([2, 7]), 4)
    assert bounds.tolist() == [0, 2, 6, 9]
    assert lengths.tolist() == [2, 4, 3]


def test_empty_document_packs_to_no_block():
    bounds, lengths = _blocks(np.zeros(0, np.int64), 8)
    assert lengths.tolist() == []


@pytest.mark.parametrize("seed", range(40))
def test_packing_properties_random(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    ids = rng.integers(0, 12, size=n)  # about 1 in 12 tokens ends a sentence (id 0)
    if seed % 4 == 0:
        ids[rng.integers(0, n) : n] = 5  # a long unpunctuated tail
    max_tokens = int(rng.integers(1, 40))
    bounds, lengths = _blocks(ids, max_tokens)
    ends = np.cumsum(lengths)
    assert lengths.sum() == n  # nothing dropped
    assert lengths.min() >= 1 and lengths.max() <= max_tokens
    assert set(ends.tolist()) <= set(bounds.tolist())  # blocks end at candidate cut points only
    sentence_ends = (np.flatnonzero(ids == END) + 1).tolist()
    assert set(sentence_ends) <= set(bounds.tolist())
    starts = np.concatenate(([0], ends[:-1]))
    for start, stop in zip(starts[:-1], ends[:-1]):
        # greedy: the next cut point after this block's end would not have fit
        nxt = bounds[np.searchsorted(bounds, stop, side="right")]
        assert nxt - start > max_tokens


def _packer(tok, max_tokens, fmt="jsonl"):
    return Packer(tok.backend_tokenizer.to_str(), max_tokens, "uint16", [fmt],
                  FieldSpec(columns=["text", "title"]))


def test_packer_documents_round_trip_and_never_share_blocks(tok, encode):
    texts = [
        "The cat sat on the mat. It was warm! Was it happy? Yes.",
        "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen",
        "Short.",
        "A first sentence here. And a second, longer sentence that goes on for a while. Third one.",
    ]
    records = [Record(0, i + 1, f'{{"text": "{t}"}}'.encode()) for i, t in enumerate(texts)]
    res = _packer(tok, 8)(0, records)
    assert res.records == 4 and res.bad == []
    assert res.blocks_per_doc.sum() == len(res.lengths)
    assert res.lengths.max() <= 8 and res.lengths.min() >= 1
    assert res.tokens.dtype == np.uint16
    offsets = np.concatenate(([0], np.cumsum(res.lengths)))
    doc_first = np.concatenate(([0], np.cumsum(res.blocks_per_doc)))
    for d, text in enumerate(texts):
        first, last = int(doc_first[d]), int(doc_first[d + 1])
        doc_tokens = res.tokens[offsets[first] : offsets[last]]
        assert doc_tokens.tolist() == encode(text)  # exactly the document: its blocks hold no other tokens
    # the unpunctuated 15-word document is cut every 8 tokens
    assert res.lengths[doc_first[1] : doc_first[2]].tolist() == [8, 7]


def test_packer_prefers_sentence_ends(tok, encode):
    text = "the cat sat. a dog ran. birds fly over the hills. we rest."  # sentences of 4, 4, 6 and 3 tokens
    assert len(encode(text)) == 17
    res = _packer(tok, 8)(0, [Record(0, 1, f'{{"text": "{text}"}}'.encode())])
    assert res.lengths.tolist() == [8, 6, 3]
    dot = tok.convert_tokens_to_ids(".")
    assert all(res.tokens[e] == dot for e in np.cumsum(res.lengths) - 1)


def test_packer_reports_bad_records_and_tokenless_documents(tok):
    records = [Record(0, 1, b'{"text": "fine."}'), Record(0, 2, b'{"text": '), Record(0, 3, '{"text": "\u200b"}'.encode())]
    res = _packer(tok, 8)(0, records)
    assert res.records == 3 and res.blocks_per_doc.tolist() == [1]
    assert [(b[1], b[2]) for b in res.bad] == [(2, "malformed json"), (3, "empty document")]
