"""Shared fixtures for the shard / prepare / inspect tests: small inputs, tokenizers, prepared folders."""
from __future__ import annotations

import os
import shutil

# Triton reads this when a kernel is decorated, and DeepSpeed / transformers may import Triton early:
# without a GPU, every Triton kernel in the tests runs in the interpreter.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dupmae.data_pipeline.prepare import PrepareConfig, prepare
from dupmae.engine.config import _toml_value
from dupmae.data_pipeline.shards import Shard
from dupmae.data_pipeline.tokenizer import load_fast_tokenizer, resolve_tokenizer_path

REPO = Path(__file__).resolve().parents[1]
WORDNET = REPO / "data" / "wordnet" / "corpus.jsonl"


def write_jsonl(path: Path, rows) -> Path:
    """Rows are dicts (dumped as JSON) or raw bytes (written verbatim), one per line."""
    with open(path, "wb") as f:
        for row in rows:
            f.write((row if isinstance(row, bytes) else json.dumps(row).encode("utf-8")) + b"\n")
    return path


def run_prepare(inputs, out, log=None, **kw) -> dict:
    """`prepare` with fast test defaults: one inline worker, no progress bar, max_len 64."""
    kw = {"max_len": 64, "workers": 1, "progress": False, **kw}
    cfg = PrepareConfig(inputs=[str(p) for p in inputs], out_dir=str(out), **kw)
    return prepare(cfg, log=log if log is not None else (lambda m: None))


def shard_documents(out: Path) -> list[np.ndarray]:
    """Token ids of every document in a prepared folder (its samples concatenated), in order."""
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    docs = []
    for entry in manifest["shards"]:
        s = Shard.open(Path(out) / entry["name"])
        for d in range(len(s.doc_index) - 1):
            parts = [np.asarray(s[i], dtype=np.int64) for i in range(int(s.doc_index[d]), int(s.doc_index[d + 1]))]
            docs.append(np.concatenate(parts) if parts else np.zeros(0, np.int64))
    return docs


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """relative path -> (inode, mtime_ns, sha256) for every file: any rewrite changes the inode/mtime."""
    snap = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            st = p.stat()
            snap[str(p.relative_to(folder))] = (st.st_ino, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return snap


@pytest.fixture(scope="session")
def helpers():
    """The plain helper functions above, for test modules (no `import conftest`)."""
    return SimpleNamespace(write_jsonl=write_jsonl, run_prepare=run_prepare, shard_documents=shard_documents,
                           snapshot=snapshot, WORDNET=WORDNET)


@pytest.fixture(scope="session")
def tok():
    """The default (bert-base-uncased WordPiece) fast tokenizer. Shared: never mutate it."""
    return load_fast_tokenizer(str(resolve_tokenizer_path(None)))


@pytest.fixture(scope="session")
def encode(tok):
    def _encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    return _encode


@pytest.fixture(scope="session")
def wordnet_subset(tmp_path_factory) -> Path:
    """The first 1,200 documents of the embedded WordNet corpus (real text, BEIR title + text)."""
    path = tmp_path_factory.mktemp("wordnet") / "wordnet-1200.jsonl"
    with open(WORDNET, "rb") as f:
        path.write_bytes(b"".join(next(f) for _ in range(1200)))
    return path


@pytest.fixture(scope="session")
def prepared_wordnet(tmp_path_factory, wordnet_subset) -> Path:
    """A finished preparation of `wordnet_subset` (3 shards of 400 records). Read-only: copy to modify."""
    out = tmp_path_factory.mktemp("prepared") / "wordnet"
    run_prepare([wordnet_subset], out, docs_per_shard=400)
    return out


@pytest.fixture(scope="session")
def extra_token_tokenizer(tmp_path_factory) -> Path:
    """The default tokenizer saved with one added token: same ids, but another vocab (and vocab hash)."""
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(str(resolve_tokenizer_path(None)), local_files_only=True)
    assert fresh.add_tokens(["dupmaeextratoken"]) == 1
    path = tmp_path_factory.mktemp("tokenizers") / "extra-token"
    fresh.save_pretrained(str(path))
    return path


WIDE_WORDS = [".", ",", "!", "?", "alpha", "beta", "gamma", "delta", "omega", "##s"]


@pytest.fixture(scope="session")
def wide_tokenizer(tmp_path_factory) -> Path:
    """A tiny-grammar WordPiece tokenizer whose vocabulary exceeds 65,536 entries; its real words have ids
    above 65,535, so they only survive in uint32 shards."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    for i in range(66_000):
        vocab[f"filler{i}"] = len(vocab)
    for w in WIDE_WORDS:
        vocab[w] = len(vocab)
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")
    path = tmp_path_factory.mktemp("tokenizers") / "wide"
    fast.save_pretrained(str(path))
    return path


# -- the trainer's tests: tiny shards from the real corpus and tiny-model TOML recipes ------------------

TINY_ENCODER = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """The first 3,000 WordNet documents prepared at max_len 32 (one shard, about 3,300 samples). Read-only."""
    root = tmp_path_factory.mktemp("tiny-shards")
    src = root / "wordnet-3000.jsonl"
    with open(WORDNET, "rb") as f:
        src.write_bytes(b"".join(next(f) for _ in range(3000)))
    out = root / "wordnet-32"
    run_prepare([src], out, max_len=32, docs_per_shard=100_000)
    return out


@pytest.fixture(scope="session")
def tiny_recipe(tiny_shards):
    """`tiny_recipe(path, run_dir, dropout=True, train={"max_steps": 8}, ...)` writes a TOML recipe for a
    2-layer, 32-wide BERT on `tiny_shards` (fp32, reference kernels, no DataLoader workers, a log line and
    TensorBoard scalars every step, only the final checkpoint); keyword sections update the defaults."""

    def make(path: Path, run_dir: Path, dropout: bool = True, **sections) -> Path:
        encoder = dict(TINY_ENCODER)
        if not dropout:
            encoder.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        recipe = {
            "model": {"encoder_config": encoder, "kernels": "reference"},
            "data": {"shards": [str(tiny_shards)], "micro_batch": 4, "num_workers": 0},
            "train": {"run_dir": str(run_dir), "max_steps": 6, "precision": "fp32"},
            "checkpoint": {"every": 1000},
            "logging": {"every": 1, "tensorboard": True},
        }
        for section, values in sections.items():
            recipe.setdefault(section, {}).update(values)
        text = "\n".join(f"[{s}]\n" + "\n".join(f"{k} = {_toml_value(v)}" for k, v in vals.items()) + "\n"
                         for s, vals in recipe.items())
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return make


def free_port() -> int:
    """A TCP port nothing listens on now, for a test's rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
