"""Plain-PyTorch definitions of DupMAE's hot ops: the specification, and the CPU path.

None of them builds the full tensors the reference code builds:

- `bow_max_pool(hidden, weight, bias, valid)`: the vocabulary projection of every position, max-pooled over
  the sequence, computed `vocab_chunk` vocabulary columns at a time. Never holds B x L x V: peak extra
  memory is B x L x vocab_chunk logits. Backward routes dmu through the saved argmax as one sparse
  (B*L x V, B*V entries) matrix product each for dhidden and dW: O(B x V x D) work, not the
  O(B x L x V x D) of differentiating full logits, and no B x V x D temporary.
- `bow_loss(mu, bow_ids, bow_mask, bow_counts)`: log-softmax of mu and the bag-of-words NLL (B x V only).
- `linear_cross_entropy(hidden, weight, bias, labels)`: mean cross-entropy of `hidden @ weight.T + bias`,
  `token_chunk` rows at a time; gradients are computed in the same pass (the logits of a chunk are never
  kept), so peak extra memory is token_chunk x V logits plus one V x D gradient accumulator.
- `decoder_attention(q, k, v, seeds, word_ids, lengths, p_dec, ...)`: attention of the query stream over
  the key/value stream under the per-row visibility mask of `philox.decoder_visibility`, `row_chunk` query
  rows at a time, each chunk recomputed in backward (activation checkpointing). Peak memory for the mask
  is B x row_chunk x L booleans and for the scores B x H x row_chunk x L floats, in forward and backward,
  instead of B x L x L (mask) and B x H x L x L (probabilities kept for backward).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .philox import decoder_visibility

VOCAB_CHUNK = 2048
TOKEN_CHUNK = 256
ROW_CHUNK = 128


# ---- bag-of-words max pool ------------------------------------------------------------------------------

class _BowMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, valid, vocab_chunk):
        B, L, D = hidden.shape
        V = weight.shape[0]
        mu = hidden.new_empty(B, V)
        argmax = torch.empty(B, V, dtype=torch.long, device=hidden.device)
        neg_inf = torch.finfo(hidden.dtype).min
        invalid = ~valid[:, :, None]
        for v0 in range(0, V, vocab_chunk):
            v1 = min(v0 + vocab_chunk, V)
            logits = torch.matmul(hidden, weight[v0:v1].t())
            if bias is not None:
                logits += bias[v0:v1]
            logits.masked_fill_(invalid, neg_inf)
            mu[:, v0:v1], argmax[:, v0:v1] = logits.max(dim=1)
        ctx.save_for_backward(hidden, weight, argmax)
        ctx.has_bias = bias is not None
        ctx.vocab_chunk = vocab_chunk
        ctx.mark_non_differentiable(argmax)
        return mu, argmax

    @staticmethod
    def backward(ctx, dmu, _dargmax):
        hidden, weight, argmax = ctx.saved_tensors
        B, L, D = hidden.shape
        V = weight.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        # dmu[b, v] flows to exactly one logit, (b, argmax[b, v], v): the B*L x V matrix M holding those
        # B*V entries is sparse, and dhidden = M @ W, dW = M^T @ hidden, db = column sums of dmu.
        rows = (torch.arange(B, device=hidden.device)[:, None] * L + argmax).reshape(-1)
        cols = torch.arange(V, device=hidden.device).repeat(B)
        vals = dmu.to(acc).reshape(-1)
        dhidden = dweight = dbias = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            if ctx.needs_input_grad[0]:
                order = torch.argsort(rows, stable=True)
                crow = torch.zeros(B * L + 1, dtype=torch.long, device=hidden.device)
                crow[1:] = torch.cumsum(torch.bincount(rows, minlength=B * L), 0)
                m = torch.sparse_csr_tensor(crow, cols[order], vals[order], (B * L, V), check_invariants=False)
                dhidden = torch.sparse.mm(m, weight.to(acc)).reshape(B, L, D).to(hidden.dtype)
            if ctx.needs_input_grad[1]:
                # M^T: row v holds (b, b * L + argmax[b, v]) for b = 0..B-1, already in order
                order = torch.arange(B * V, device=hidden.device).reshape(B, V).t().reshape(-1)
                crow = torch.arange(0, B * V + 1, B, device=hidden.device)
                mt = torch.sparse_csr_tensor(crow, rows[order], vals[order], (V, B * L), check_invariants=False)
                dweight = torch.sparse.mm(mt, hidden.reshape(B * L, D).to(acc)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dmu.to(acc).sum(0).to(weight.dtype)
        return dhidden, dweight, dbias, None, None


def bow_max_pool(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, valid: torch.Tensor,
                 vocab_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """mu[b, v] = max over positions l with valid[b, l] of (hidden[b, l] . weight[v] + bias[v]); and the argmax.

    hidden (B, L, D), weight (V, D), bias (V,) or None, valid (B, L) bool. A row with no valid position
    gets the dtype's lowest value and argmax 0 (its gradient then lands on position 0).
    """
    return _BowMaxPool.apply(hidden, weight, bias, valid.bool(), vocab_chunk or VOCAB_CHUNK)


def bow_loss(mu: torch.Tensor, bow_ids: torch.Tensor, bow_mask: torch.Tensor, bow_counts: torch.Tensor,
             normalization: str = "count", reduction: str = "mean") -> torch.Tensor:
    """Bag-of-words NLL: -(1/n_b) * sum over the distinct tokens v of x_b of log_softmax(mu_b)[v]
    (normalization "count", the reference code), or the plain sum ("sum", the paper); then the mean over
    the batch, or with reduction="sum" the sum."""
    logp = torch.log_softmax(mu.to(torch.promote_types(mu.dtype, torch.float32)), dim=-1)
    picked = logp.gather(1, bow_ids) * bow_mask
    per_sample = -picked.sum(1)
    if normalization == "count":
        per_sample = per_sample / bow_counts.clamp(min=1).to(per_sample.dtype)
    elif normalization != "sum":
        raise ValueError(f"bow normalization must be 'count' or 'sum', got {normalization!r}")
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


# ---- linear + cross-entropy -----------------------------------------------------------------------------

class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_chunk, reduction, grad_enabled):
        N, D = hidden.shape
        keep = labels != -100
        count = int(keep.sum())
        want_grad = grad_enabled and any(ctx.needs_input_grad[:3])  # needs_input_grad ignores torch.no_grad
        acc = torch.promote_types(hidden.dtype, torch.float32)  # low-precision inputs accumulate in fp32
        dhidden = torch.zeros_like(hidden) if want_grad else None
        dweight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_grad else None
        dbias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if (
            want_grad and bias is not None) else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        rows = keep.nonzero().flatten()
        for r0 in range(0, rows.numel(), token_chunk):
            idx = rows[r0 : r0 + token_chunk]
            h = hidden[idx]
            y = labels[idx]
            logits = torch.matmul(h, weight.t())
            if bias is not None:
                logits += bias
            logits = logits.to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if want_grad:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place: one V-wide buffer per chunk
                grad[torch.arange(len(idx), device=grad.device), y] -= 1.0
                grad = grad.to(hidden.dtype)
                dhidden[idx] = torch.matmul(grad, weight)
                dweight += torch.matmul(grad.t(), h).to(acc)
                if dbias is not None:
                    dbias += grad.to(acc).sum(0)
        scale = 1.0 / max(count, 1) if reduction == "mean" else 1.0
        ctx.scale = scale
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        if want_grad:
            ctx.save_for_backward(dhidden, dweight, dbias if dbias is not None else torch.empty(0))
        return total * scale

    @staticmethod
    def backward(ctx, dloss):
        dhidden, dweight, dbias = ctx.saved_tensors
        g = dloss * ctx.scale
        return (
            dhidden * g.to(dhidden.dtype) if ctx.needs_input_grad[0] else None,
            (dweight * g).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None,
            (dbias * g).to(dhidden.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, token_chunk: int | None = None, reduction: str = "mean") -> torch.Tensor:
    """CE(hidden @ weight.T + bias, labels) over the rows with labels != -100: their mean (0 when there is
    none) or, with reduction="sum", their sum. hidden (N, D), weight (V, D), labels (N,). Never holds more
    than token_chunk x V logits."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, token_chunk or TOKEN_CHUNK, reduction,
                                     torch.is_grad_enabled())


# ---- the enhanced decoder's attention -------------------------------------------------------------------

def _attention_rows(q, k, v, seeds, word_ids, lengths, p_dec, dropout_p, sep_visible, r0, r1, scale):
    visible = decoder_visibility(seeds, word_ids, lengths, p_dec, rows=slice(r0, r1),
                                 sep_always_visible=sep_visible)  # (B, R, L)
    empty = ~visible.any(-1, keepdim=True)  # a row that sees nothing outputs zeros (and gets no gradient)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=(visible | empty)[:, None], dropout_p=dropout_p,
                                         scale=scale)
    return out.masked_fill(empty[:, None, :, :], 0.0)


def decoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seeds: torch.Tensor,
                      word_ids: torch.Tensor, lengths: torch.Tensor, p_dec: float = 0.5, dropout_p: float = 0.0,
                      sep_always_visible: bool = True, row_chunk: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) under the decoder visibility mask) v, per head.

    q (B, H, L, d) from the query stream; k, v (B, H, L, d) from the key/value stream; seeds (B,) int64,
    word_ids (B, L), lengths (B,) as the collator makes them. A query row that sees no key (possible only
    for row 0 when the [SEP] is not always visible) outputs zeros. `dropout_p` drops attention
    probabilities (torch's RNG; the checkpointed chunks replay it exactly in backward).
    """
    L = q.shape[2]
    row_chunk = row_chunk or ROW_CHUNK
    scale = 1.0 / math.sqrt(q.shape[-1])
    outs = []
    for r0 in range(0, L, row_chunk):
        r1 = min(r0 + row_chunk, L)
        args = (q[:, :, r0:r1], k, v, seeds, word_ids, lengths, p_dec, dropout_p, sep_always_visible, r0, r1, scale)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            outs.append(checkpoint(_attention_rows, *args, use_reentrant=False))
        else:
            outs.append(_attention_rows(*args))
    return torch.cat(outs, dim=2)
