"""The DupMAE retrieval representation (paper section 3.4), written once: fine-tuning trains it, `dupmae export`
writes it, `DupMAEEncoder` serves it, all through `Retriever.represent`.

    dense  W_cls h_[CLS]      a linear D -> d' (no bias) of the final [CLS] state; d' = 0: the raw [CLS]
                              (pooling "mean": the mean of the token states instead of [CLS])
    mu     max over positions 1..len-1 (padding and [CLS] excluded, no ReLU) of the MLM head's logits: exactly
           what L_bow trains, through `kernels.bow_max_pool` (never B x L x V)
    documents keep the top-k of mu (default 384), queries keep all of it

    score(q, d) = dense_q . dense_d + bow_weight * sum over d's kept ids i of mu_q[i] * mu_d[i]      (Eq. 12)

`document_top_k` is the one place where a document's kept ids are chosen: training scatters the kept values
back into a zero vector (`scatter_top_k`, gradients flow to the kept entries only), search keeps them as
(ids, values); both take the same `torch.topk`, so what is trained is what is served.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

PROJECTION_FILE = "dense_projection.safetensors"  # W_cls beside model.safetensors in an exported folder
POOLINGS = ("cls", "mean")
MODES = ("dense", "bow", "hybrid")


def bow_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The positions mu pools over: 1..len-1 (the [CLS] position and padding excluded, [SEP] included)."""
    col = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :]
    return attention_mask.bool() & (col > 0)


def document_top_k(mu: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of each row's k largest entries (k >= vocabulary: every entry, in vocabulary order)."""
    if k <= 0 or k >= mu.shape[1]:
        ids = torch.arange(mu.shape[1], device=mu.device).expand(mu.shape[0], -1)
        return mu, ids
    return torch.topk(mu, k, dim=1)


def scatter_top_k(mu: torch.Tensor, k: int) -> torch.Tensor:
    """mu with every entry outside the row's top-k set to zero (differentiable through the kept entries)."""
    if k <= 0 or k >= mu.shape[1]:
        return mu
    values, ids = document_top_k(mu, k)
    return torch.zeros_like(mu).scatter(1, ids, values)


def scores(q_dense, q_mu, d_dense, d_mu_kept, mode: str = "hybrid", bow_weight: float = 1.0) -> torch.Tensor:
    """Eq. 12 for every (query, document) pair: (Q, D). `d_mu_kept` holds zeros outside the kept ids."""
    if mode == "dense":
        return q_dense @ d_dense.t()
    bow = q_mu @ d_mu_kept.t()
    if mode == "bow":
        return bow
    return q_dense @ d_dense.t() + bow_weight * bow


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x itself in the forward pass; its gradient multiplied by `scale` in the backward pass (0: none reaches x).
    A function rather than `x.detach()`: the graph keeps the shape it has at scale 1 (untested under ZeRO-3 with a
    scale below 1: the ZeRO-3 equivalence test runs the default)."""
    return _ScaleGrad.apply(x, float(scale))


class Represented(NamedTuple):
    """A NamedTuple, not a dataclass: DeepSpeed's ZeRO-3 hooks only see tensors inside tuples, lists and dicts,
    and must see these to gather the tied MLM weight again when backward reaches the max-pool."""

    dense: torch.Tensor | None  # (B, d') or (B, D)
    mu: torch.Tensor | None  # (B, V), all of it (apply the document top-k with scatter_top_k / document_top_k)
    tokens: int = 0  # real tokens encoded


class Retriever(nn.Module):
    """A BertForMaskedLM and W_cls. `represent` gives the dense part and mu of a batch of tokenized texts,
    computing only what `modes` need (a dense-only call never projects onto the vocabulary)."""

    def __init__(self, lm, dense_dim: int = 384, pooling: str = "cls", normalize: bool = False,
                 kernels_impl: str = "auto", bow_encoder_grad: float = 1.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if dense_dim < 0:
            raise ValueError(f"dense_dim must be >= 0, got {dense_dim}")
        self.lm = lm
        self.pooling = pooling
        self.normalize = normalize
        self.kernels_impl = kernels_impl
        # training only: the share of the BoW part's gradient that reaches the shared encoder and the tied word
        # embeddings (the values computed are the same for every setting; see scale_grad)
        self.bow_encoder_grad = float(bow_encoder_grad)
        hidden = int(lm.config.hidden_size)
        self.w_cls = nn.Linear(hidden, dense_dim, bias=False) if dense_dim else None
        if self.w_cls is not None:
            self.reset_projection()

    def reset_projection(self) -> None:
        """W_cls at initialization: the identity when d' = D (the pre-trained [CLS] geometry is kept at
        step 0), otherwise a random Gaussian map with variance 1/d' (dot products preserved in expectation)."""
        w = self.w_cls.weight
        with torch.no_grad():
            if w.shape[0] == w.shape[1]:
                w.copy_(torch.eye(w.shape[0], dtype=w.dtype))
            else:
                w.normal_(0.0, w.shape[0] ** -0.5)

    @property
    def config(self):
        return self.lm.config

    @property
    def dense_dim(self) -> int:
        return self.w_cls.out_features if self.w_cls is not None else int(self.lm.config.hidden_size)

    def _head(self):
        p = self.lm.cls.predictions  # looked up at call time (ZeRO-3 gathers the tied weight through it)
        return p.transform, p.decoder.weight, p.decoder.bias

    def represent(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  modes=("dense", "bow")) -> Represented:
        from dupmae import kernels

        hidden = self.lm.bert(input_ids=input_ids, attention_mask=attention_mask,
                              return_dict=True).last_hidden_state
        dense = mu = None
        if "dense" in modes:
            if self.pooling == "cls":
                dense = hidden[:, 0]
            else:
                m = attention_mask[:, :, None].to(hidden.dtype)
                dense = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            if self.w_cls is not None:
                dense = self.w_cls(dense)
            if self.normalize:
                dense = nn.functional.normalize(dense, dim=-1)
        if "bow" in modes:
            transform, weight, bias = self._head()
            if self.bow_encoder_grad != 1.0 and torch.is_grad_enabled():
                hidden, weight = (scale_grad(t, self.bow_encoder_grad) for t in (hidden, weight))
            mu, _ = kernels.bow_max_pool(transform(hidden), weight, bias, bow_positions(attention_mask),
                                         impl=self.kernels_impl)
        return Represented(dense, mu, int(attention_mask.sum()))


def modes_needed(mode: str) -> tuple[str, ...]:
    """The representation parts a scoring mode reads."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return ("dense", "bow") if mode == "hybrid" else (mode,)


def load_projection(folder, retriever: Retriever) -> bool:
    """Load W_cls from an exported folder into `retriever`; False when the folder has none."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(folder) / PROJECTION_FILE
    if not path.is_file():
        return False
    weight = load_file(str(path))["weight"]
    if retriever.w_cls is None or tuple(retriever.w_cls.weight.shape) != tuple(weight.shape):
        retriever.w_cls = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        retriever.w_cls.weight.copy_(weight)
    return True
