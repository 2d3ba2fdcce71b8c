"""`dupmae train-tokenizer`: a BERT-style WordPiece vocabulary learned from your own text.

The folder it writes is what `dupmae prepare --tokenizer DIR`, `tokenizer_info(DIR)` and transformers'
`BertTokenizerFast.from_pretrained(DIR)` read:
    tokenizer.json            the fast tokenizer: BertNormalizer (lower-cased, accents stripped, CJK
                              characters split), BertPreTokenizer, WordPiece ("##" continuations, [UNK]),
                              the BERT post-processor ([CLS] A [SEP], [CLS] A [SEP] B [SEP]), WordPiece decoder
    vocab.txt                 the vocabulary, one token a line in id order
    tokenizer_config.json     BertTokenizer settings and special tokens
    special_tokens_map.json

Ids: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4; then every character of the alphabet as a word start,
then as a "##" continuation (punctuation and CJK characters, always words of their own, only as starts),
then the learned pieces in the order they were learned.

How it learns: like `tokenizers`' WordPieceTrainer, by byte-pair merges over words, most frequent pair
first, then read as a WordPiece vocabulary. WordPieceTrainer itself is not used: it numbers its "##"
symbols in hash-map order, so the vocabulary changes from run to run (huggingface/tokenizers#1794). Here
every word is marked at its start with U+2581 instead, so a plain BpeTrainer sees one alphabet of
characters, numbered in code point order, and breaks ties between equally frequent pairs by those numbers:
a piece that starts with the mark is a word start ("\u2581ing" -> "ing"), any other a continuation
("ing" -> "##ing"). The alphabet (the `limit_alphabet` most frequent characters after normalization, ties
by code point) is counted in a first pass over the input, so the same text always gives the same files.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .readers import BadRecord, FieldSpec, expand_inputs, iter_records, record_text
from .tokenizer import TokenizerError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORD_START = "\u2581"
FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
MAX_REPORTED = 5


@dataclass
class TrainTokenizerConfig:
    inputs: list[str]
    out_dir: str
    vocab_size: int = 30522
    min_frequency: int = 2
    limit_alphabet: int = 1000
    format: str = "auto"
    text_field: str = "text"
    title_field: str | None = "title"
    text_mode: str = "line"
    model_max_length: int = 512
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if not self.inputs:
            raise TokenizerError("no input: give jsonl / text / parquet files, globs or saved dataset folders")
        if self.vocab_size < len(SPECIAL_TOKENS) + 2:
            raise TokenizerError(f"--vocab-size {self.vocab_size} is too small: the {len(SPECIAL_TOKENS)} special "
                                 "tokens alone take 5 ids")
        if self.min_frequency < 1:
            raise TokenizerError(f"--min-frequency must be >= 1, got {self.min_frequency}")
        if self.limit_alphabet < 1:
            raise TokenizerError(f"--limit-alphabet must be >= 1, got {self.limit_alphabet}")
        if self.text_mode not in ("line", "block"):
            raise TokenizerError(f"--text-mode must be line or block, got {self.text_mode!r}")
        if self.model_max_length < 8:
            raise TokenizerError(f"--model-max-length must be >= 8, got {self.model_max_length}")


def _normalizer():
    from tokenizers import normalizers

    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)


def is_isolated(ch: str) -> bool:
    """Characters BertPreTokenizer always cuts out as words of their own (so never "##" continuations):
    punctuation (ASCII symbols included, as BERT counts them) and CJK ideographs."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    if unicodedata.category(ch).startswith("P"):
        return True
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


class _Texts:
    """The input's document texts, re-readable (one pass counts the alphabet, the next trains)."""

    def __init__(self, cfg: TrainTokenizerConfig, log):
        self.files = expand_inputs(cfg.inputs, cfg.format)
        self.spec = FieldSpec(cfg.text_field, cfg.title_field, cfg.text_mode,
                              columns=[c for c in (cfg.text_field, cfg.title_field) if c])
        self.total_bytes = sum(f.size for f in self.files)
        self.progress = cfg.progress
        self.log = log
        self.documents = 0
        self.bad: collections.Counter = collections.Counter()
        self.first_bad: list[str] = []

    def __iter__(self):
        from tqdm import tqdm

        bar = tqdm(total=self.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="read",
                   disable=not self.progress, mininterval=1.0, dynamic_ncols=True, file=sys.stderr)
        documents, bad, first_bad = 0, collections.Counter(), []
        try:
            for rec, delta in iter_records(self.files, self.spec):
                bar.update(delta)
                f = self.files[rec.file_index]
                try:
                    text = record_text(f.format, rec.payload, self.spec)
                except BadRecord as e:
                    if e.kind != "empty document":
                        bad[e.kind] += 1
                        if len(first_bad) < MAX_REPORTED:
                            where = "row" if f.format in ("parquet", "hf") else "line"
                            first_bad.append(f"{f.path}:{where} {rec.line}: {e.kind}: {e.detail}")
                    continue
                documents += 1
                yield text.replace(WORD_START, " ")
        finally:
            bar.close()
        self.documents, self.bad, self.first_bad = documents, bad, first_bad


def count_alphabet(texts, limit: int) -> tuple[list[str], int]:
    """The `limit` most frequent non-space characters after normalization (ties by code point), sorted by code
    point; and how many distinct characters there were."""
    norm = _normalizer()
    counts: collections.Counter = collections.Counter()
    for text in texts:
        counts.update(norm.normalize_str(text))
    chars = [c for c in counts if not c.isspace()]
    kept = sorted(chars, key=lambda c: (-counts[c], ord(c)))[:limit]
    return sorted(kept), len(chars)


def wordpiece_vocab(bpe_tokens: list[str], alphabet: list[str], vocab_size: int) -> list[str]:
    """Specials, the alphabet as word starts, as continuations, then BPE pieces read as WordPiece, in order."""
    vocab = list(SPECIAL_TOKENS) + alphabet + ["##" + c for c in alphabet if not is_isolated(c)]
    seen = set(vocab)
    for piece in bpe_tokens:
        if len(vocab) >= vocab_size:
            break
        token = piece[1:] if piece.startswith(WORD_START) else "##" + piece
        if WORD_START in token or token in ("", "##") or token in seen:
            continue
        vocab.append(token)
        seen.add(token)
    return vocab


def build_tokenizer(vocab: list[str]):
    """The fast tokenizer (tokenizers.Tokenizer) of a BERT uncased WordPiece vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    ids = {t: i for i, t in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_folder(out: Path, tok, vocab: list[str], model_max_length: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                "mask_token": "[MASK]"}
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "do_basic_tokenize": True,
              "never_split": None, "tokenize_chinese_chars": True, "strip_accents": None,
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": True, **specials}
    _write_atomic(out / "tokenizer.json", tok.to_str(pretty=True) + "\n")
    _write_atomic(out / "vocab.txt", "".join(t + "\n" for t in vocab))
    _write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    _write_atomic(out / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")


def train_tokenizer(cfg: TrainTokenizerConfig, log=print) -> dict:
    """Learn the vocabulary and write the folder; returns a summary (sizes, counts)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    cfg.validate()
    out = Path(cfg.out_dir).expanduser().resolve()
    present = [n for n in FILES if (out / n).exists()]
    if present and not cfg.overwrite:
        raise TokenizerError(f"{out} already holds a tokenizer ({', '.join(present)}): use another --out folder, "
                             "or --overwrite to replace it")
    texts = _Texts(cfg, log)
    log(f"[train-tokenizer] {len(texts.files)} input file(s), {texts.total_bytes / 1e6:,.1f} MB -> {out}")
    start = time.perf_counter()
    alphabet, distinct = count_alphabet(texts, cfg.limit_alphabet)
    if texts.documents == 0:
        bad = sum(texts.bad.values())
        raise TokenizerError(f"no usable text in {len(texts.files)} input file(s)"
                             + (f"; {bad} bad record(s): " + "; ".join(texts.first_bad[:3]) if bad else ""))
    base = len(SPECIAL_TOKENS) + len(alphabet) + sum(not is_isolated(c) for c in alphabet)
    if cfg.vocab_size <= base:
        raise TokenizerError(
            f"--vocab-size {cfg.vocab_size} is too small: the special tokens and the {len(alphabet)}-character "
            f"alphabet (as word starts and as '##' continuations) already take {base} ids; raise --vocab-size "
            f"above {base} or lower --limit-alphabet (now {cfg.limit_alphabet})")
    log(f"[train-tokenizer] {texts.documents:,} documents; alphabet {len(alphabet)} of {distinct} distinct "
        f"characters; {base} base ids")
    if texts.bad:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(texts.bad.items()))
        log(f"[train-tokenizer] skipped {sum(texts.bad.values())} bad record(s): {kinds}")
        for line in texts.first_bad:
            log(f"[train-tokenizer]   {line}")

    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Sequence([normalizers.Replace(WORD_START, " "), _normalizer()])
    learner.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.BertPreTokenizer(),
        pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always", split=False)])
    initial = sorted(set(alphabet) | {WORD_START})
    # enough merges for the wanted size: merges of the mark with one character repeat a base id and are skipped
    trainer = trainers.BpeTrainer(vocab_size=len(initial) + cfg.vocab_size - base + len(alphabet),
                                  min_frequency=cfg.min_frequency, special_tokens=[], initial_alphabet=initial,
                                  limit_alphabet=len(initial), show_progress=cfg.progress)
    learner.train_from_iterator(texts, trainer=trainer)
    learned = [t for t, _ in sorted(learner.get_vocab().items(), key=lambda kv: kv[1])[len(initial):]]
    vocab = wordpiece_vocab(learned, alphabet, cfg.vocab_size)
    tok = build_tokenizer(vocab)
    write_folder(out, tok, vocab, cfg.model_max_length)
    elapsed = time.perf_counter() - start
    if len(vocab) < cfg.vocab_size:
        log(f"[train-tokenizer] the text holds only {len(vocab):,} pieces at --min-frequency {cfg.min_frequency} "
            f"(asked for {cfg.vocab_size:,}): the vocabulary is smaller")
    log(f"[train-tokenizer] done: vocabulary {len(vocab):,} ({len(vocab) - base:,} learned pieces) in "
        f"{elapsed:.1f} s -> {out}")
    return {"out": str(out), "vocab_size": len(vocab), "alphabet": len(alphabet), "documents": texts.documents,
            "bad_records": sum(texts.bad.values()), "learned": len(vocab) - base}


__all__ = ["TrainTokenizerConfig", "train_tokenizer", "SPECIAL_TOKENS"]
