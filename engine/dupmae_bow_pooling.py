"""DupMAE's bag-of-words pooling as a sentence-transformers module (`SparseEncoder`), shipped as a file inside
the exported folder (`dupmae export` copies it to `sentence-transformers/sparse/dupmae_bow_pooling.py`).

It follows the MLM transformer (`features["token_embeddings"]` = the MLM logits of every position) and makes
DupMAE's mu, exactly as `dupmae.engine.representation.Retriever.represent` does:

    mu[v] = max over positions 1..len-1 of logits[position, v]     ([CLS] and padding excluded, no ReLU)

then keeps, for documents (`task == "document"`: `SparseEncoder.encode_document`), the `top_k_document`
largest entries of mu (the others set to 0), and for queries (`encode_query`, task "query") all of it. The
dot product of a query and a document vector is then DupMAE's BoW score (Eq. 12: the sum over the document's
kept ids of mu_q * mu_d). `encode()` without a task uses `default_task`.

Standalone on purpose (torch and sentence-transformers only): the folder must load without dupmae installed,
with `SparseEncoder(path, trust_remote_code=True)` (sentence-transformers >= 6 imports a module class from a
model folder only with that flag).
"""
from __future__ import annotations

import torch

try:  # sentence-transformers >= 5.4 (the v6 home of the base class)
    from sentence_transformers.base.modules.module import Module
except ImportError:  # 5.x
    try:
        from sentence_transformers.models.Module import Module
    except ImportError:
        from sentence_transformers.models import Module

TASKS = ("query", "document")


class DupMAEBoWPooling(Module):
    config_keys: list[str] = ["top_k_document", "embedding_dimension", "drop_cls", "default_task"]
    forward_kwargs = {"task"}

    def __init__(self, top_k_document: int = 384, embedding_dimension: int | None = None, drop_cls: bool = True,
                 default_task: str = "document") -> None:
        super().__init__()
        if default_task not in TASKS:
            raise ValueError(f"default_task must be 'query' or 'document', got {default_task!r}")
        self.top_k_document = int(top_k_document)
        self.embedding_dimension = embedding_dimension
        self.drop_cls = bool(drop_cls)
        self.default_task = default_task

    def _keep(self, mu: torch.Tensor, task: str | None) -> torch.Tensor:
        task = task or self.default_task
        k = self.top_k_document
        if task != "document" or k <= 0 or k >= mu.shape[1]:
            return mu
        values, ids = torch.topk(mu, k, dim=1)
        return torch.zeros_like(mu).scatter(1, ids, values)

    def forward(self, features: dict, task: str | None = None, **kwargs) -> dict:
        logits = features["token_embeddings"]
        lowest = torch.finfo(logits.dtype).min  # what a text with no valid position gets (as the kernel does)
        if "cu_seq_lens_q" in features:  # flattened (unpadded) inputs: (1, total tokens, V), one segment a text
            flat = logits.squeeze(0)
            bounds = features["cu_seq_lens_q"].tolist()
            rows = []
            for a, b in zip(bounds[:-1], bounds[1:]):
                a = a + 1 if self.drop_cls else a
                rows.append(flat[a:b].amax(0) if b > a else flat.new_full((flat.shape[-1],), lowest))
            mu = torch.stack(rows)
        else:
            valid = features["attention_mask"].bool()
            if self.drop_cls:
                valid = valid.clone()
                valid[:, 0] = False
            mu = logits.masked_fill(~valid[:, :, None], lowest).amax(1)
        if self.embedding_dimension is None:
            self.embedding_dimension = int(mu.shape[1])
        features["sentence_embedding"] = self._keep(mu, task)
        return features

    def get_sentence_embedding_dimension(self) -> int | None:  # sentence-transformers 5.x name
        return self.embedding_dimension

    def get_embedding_dimension(self) -> int | None:  # 6.x name
        return self.embedding_dimension

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)

    def __repr__(self) -> str:
        return f"DupMAEBoWPooling({self.get_config_dict()})"
