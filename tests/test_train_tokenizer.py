"""`dupmae train-tokenizer`: the folder loads everywhere a tokenizer is read, specials have BERT's roles and
our ids, `dupmae prepare` runs with it, the same text gives byte-identical files (also in a fresh process),
and bad requests fail with a message that says what to change."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import islice

import pytest

from dupmae.data_pipeline.readers import InputError
from dupmae.data_pipeline.tokenizer import TokenizerError, load_fast_tokenizer, tokenizer_info, vocab_hash
from dupmae.data_pipeline.train_tokenizer import (FILES, SPECIAL_TOKENS, TrainTokenizerConfig, is_isolated,
                                                 train_tokenizer)
from dupmae.engine.cli import main

VOCAB = 600


@pytest.fixture(scope="module")
def text(tmp_path_factory, helpers):
    """2,000 WordNet definitions with their lemmas as titles (real English, shipped in the repo)."""
    path = tmp_path_factory.mktemp("text") / "defs.jsonl"
    with open(helpers.WORDNET, encoding="utf-8") as f:
        rows = [json.loads(line) for line in islice(f, 2000)]
    return helpers.write_jsonl(path, rows)


def train(inputs, out, **kw):
    cfg = TrainTokenizerConfig(inputs=[str(p) for p in inputs], out_dir=str(out), progress=False, **kw)
    return train_tokenizer(cfg, log=lambda m: None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text):
    out = tmp_path_factory.mktemp("tok") / "wordnet-600"
    summary = train([text], out, vocab_size=VOCAB)
    return out, summary


def test_folder_files_and_specials(trained):
    out, summary = trained
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    info = tokenizer_info(str(out))
    assert (info.pad_id, info.cls_id, info.sep_id, info.mask_id) == (0, 2, 3, 4)
    assert info.special_ids == (0, 1, 2, 3, 4)
    assert info.vocab_size == summary["vocab_size"] == VOCAB
    vocab = (out / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab[:5] == list(SPECIAL_TOKENS)
    assert len(vocab) == len(set(vocab)) == VOCAB
    tok = load_fast_tokenizer(str(out))
    assert tok.unk_token_id == 1 and tok.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    # vocab.txt is the tokenizer.json vocabulary in id order
    assert tok.backend_tokenizer.get_vocab() == {t: i for i, t in enumerate(vocab)}
    # "##" pieces continue a word, everything else starts one
    assert all(info.continues_word[i] == t.startswith("##") for i, t in enumerate(vocab))
    assert json.loads((out / "special_tokens_map.json").read_text()) == {
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}


def test_bert_behaviour(trained):
    from transformers import BertTokenizerFast

    out, _ = trained
    tok = BertTokenizerFast.from_pretrained(str(out), local_files_only=True)
    enc = tok("The Sea", "of Tranquillity")
    assert enc.input_ids[0] == 2 and enc.input_ids[-1] == 3 and enc.input_ids.count(3) == 2
    first_sep = enc.input_ids.index(3)
    assert enc.token_type_ids == [0] * (first_sep + 1) + [1] * (len(enc.input_ids) - first_sep - 1)
    # lower-cased, accents stripped, punctuation split off; every word of the training alphabet is known
    pieces = tok.tokenize("Café, the DOG's lateral organ.")
    assert "[UNK]" not in pieces and pieces[:4] == tok.tokenize("cafe , the")
    assert tok.tokenize("organ!") == ["organ", "[UNK]"]  # no "!" in the training text
    assert tok.decode(tok("a gloss of the sense").input_ids, skip_special_tokens=True) == "a gloss of the sense"
    # the specials in text stay single tokens; padding uses [PAD] = 0
    assert tok("[MASK] x").input_ids[1] == 4
    assert tok(["a", "a b c d"], padding=True).input_ids[0][-1] == 0
    # a character the training text never had is [UNK]
    assert tok.tokenize("\u263a") == ["[UNK]"]


def test_alphabet_layout(trained):
    out, summary = trained
    vocab = (out / "vocab.txt").read_text(encoding="utf-8").splitlines()
    alphabet = vocab[5:5 + summary["alphabet"]]
    assert alphabet == sorted(alphabet) and all(len(c) == 1 for c in alphabet)
    continued = [c for c in alphabet if not is_isolated(c)]
    assert vocab[5 + len(alphabet):5 + len(alphabet) + len(continued)] == ["##" + c for c in continued]
    assert "," in alphabet and "##," not in vocab and "##e" in vocab
    assert all(t == t.lower() for t in vocab[5:])


def test_prepare_with_the_trained_tokenizer(tmp_path, trained, helpers):
    out, _ = trained
    rows = [{"title": "Anchor", "text": "A mechanical device that prevents a vessel from moving."},
            {"text": "The act of moving something from one place to another."}]
    src = helpers.write_jsonl(tmp_path / "docs.jsonl", rows)
    manifest = helpers.run_prepare([src], tmp_path / "shards", tokenizer=str(out))
    tok = load_fast_tokenizer(str(out))
    assert manifest["documents"] == 2 and manifest["tokenizer"]["vocab_hash"] == vocab_hash(tok)
    assert manifest["tokenizer"]["vocab_size"] == VOCAB and manifest["dtype"] == "uint16"
    docs = helpers.shard_documents(tmp_path / "shards")
    assert [tok.decode(d) for d in docs] == ["anchor a mechanical device that prevents a vessel from moving.",
                                             "the act of moving something from one place to another."]
    # the prepared folder's own copy of the tokenizer gives the same ids
    assert vocab_hash(load_fast_tokenizer(str(tmp_path / "shards" / "tokenizer"))) == vocab_hash(tok)


def test_reruns_are_byte_identical_also_in_a_fresh_process(tmp_path, text, trained):
    out, _ = trained
    again = tmp_path / "again"
    train([text], again, vocab_size=VOCAB)
    # a new interpreter hashes differently: the order of hash maps inside the trainer changes
    env = dict(os.environ, PYTHONHASHSEED="12345")
    cmd = [sys.executable, "-m", "dupmae.engine.cli", "train-tokenizer", str(text), "--out", str(tmp_path / "cli"),
           "--vocab-size", str(VOCAB), "--no-progress"]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    for name in FILES:
        expected = (out / name).read_bytes()
        assert (again / name).read_bytes() == expected, name
        assert (tmp_path / "cli" / name).read_bytes() == expected, name


def test_small_vocabulary_stops_at_the_size_and_large_one_at_the_text(tmp_path, text):
    small = train([text], tmp_path / "small", vocab_size=200)
    assert small["vocab_size"] == 200 and len((tmp_path / "small/vocab.txt").read_text().splitlines()) == 200
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("the cat sat on the mat\nthe cat ate the rat\n")
    big = train([tiny], tmp_path / "big", vocab_size=5000, min_frequency=1)
    assert big["vocab_size"] < 5000 and big["learned"] > 0
    assert load_fast_tokenizer(str(tmp_path / "big")).tokenize("the cat sat") == ["the", "cat", "sat"]


def test_limit_alphabet_makes_rare_characters_unknown(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("aaaa bbbb aaaa bbbb abab\nzq\n")
    summary = train([src], tmp_path / "tok", vocab_size=40, limit_alphabet=2, min_frequency=1)
    assert summary["alphabet"] == 2
    tok = load_fast_tokenizer(str(tmp_path / "tok"))
    assert tok.tokenize("abab zq") == ["abab", "[UNK]"]


def test_errors_are_clear(tmp_path, text):
    with pytest.raises(TokenizerError, match="no input"):
        train([], tmp_path / "a")
    with pytest.raises(InputError, match="matches no file"):
        train([tmp_path / "missing.jsonl"], tmp_path / "a")
    with pytest.raises(TokenizerError, match="too small: the 5 special tokens"):
        train([text], tmp_path / "a", vocab_size=6)
    with pytest.raises(TokenizerError, match=r"too small: .*alphabet.*raise --vocab-size above \d+ or lower "
                                             r"--limit-alphabet"):
        train([text], tmp_path / "a", vocab_size=60)
    blank = tmp_path / "blank.jsonl"
    blank.write_text('\n{"title": "x"}\nnot json\n')
    with pytest.raises(TokenizerError, match="no usable text.*2 bad record"):
        train([blank], tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_existing_folder_needs_overwrite(tmp_path, text, trained):
    out, _ = trained
    with pytest.raises(TokenizerError, match="already holds a tokenizer.*--overwrite"):
        train([text], out, vocab_size=VOCAB)
    target = tmp_path / "copy"
    train([text], target, vocab_size=300)
    train([text], target, vocab_size=VOCAB, overwrite=True)
    assert (target / "vocab.txt").read_bytes() == (out / "vocab.txt").read_bytes()


def test_cli(tmp_path, text, capsys):
    out = tmp_path / "cli"
    assert main(["train-tokenizer", str(text), "-o", str(out), "--vocab-size", "300", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "2,000 documents" in err and "vocabulary 300" in err
    assert tokenizer_info(str(out)).vocab_size == 300
    assert main(["train-tokenizer", str(text), "-o", str(tmp_path / "x"), "--vocab-size", "10", "--no-progress"]) == 2
    assert "dupmae train-tokenizer: error: --vocab-size 10 is too small" in capsys.readouterr().err
