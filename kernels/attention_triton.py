"""Triton `decoder_attention`: flash-style attention of the enhanced decoder's query stream over its key/value
stream, with the per-row visibility mask generated inside the kernel and regenerated in backward.

The mask is `philox.decoder_visibility` evaluated on each BLOCK_M x BLOCK_N tile from (seed, row, word id):
key j is hidden from query row i when tl.rand(seed, i * WORD_STRIDE + word_ids[j]) < p_dec, except key 0
([CLS]) and, with `sep_always_visible`, key len-1 (the final [SEP]), which are visible; key i and padding are
never visible. No B x L x L tensor exists anywhere: the only per-call state is O(B x L) (word ids, lengths,
seeds) plus the B x H x L log-sum-exp saved for backward.

Forward (one program per BLOCK_M query rows of one (sample, head)): online softmax in base 2 over the key
blocks up to the sample's length (keys past it are never visible); out = acc / l; lse = m + log2(l). A row
that sees no key outputs zeros and saves lse = +inf, so backward gives it no gradient.
Backward, atomic-free: delta = rowsum(dO * O); one kernel per key block accumulates dK, dV over the query
blocks; another per query block accumulates dQ over the key blocks; each recomputes P from the saved lse.

Attention-probability dropout (BERT's `attention_probs_dropout_prob`, applied after the softmax, kept
probabilities scaled by 1 / (1 - p)): drawn in-kernel with tl.rand from one seed per call (taken from torch's
generator), head (b, h) keyed by seed + b * H + h, counter i * L + j; `philox.attention_dropout_keep` is its
PyTorch port. The reference path uses torch's own dropout instead: same distribution, other draws.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import philox
from ._triton_util import (acc_dtype, dot_precision, interpreting, launch_config, tl_dtype,
                           upcast_for_interpreter)

_WORD_STRIDE = tl.constexpr(philox.WORD_STRIDE)

# GPU launch settings: the 16-bit ones are FlashAttention-2's for head size 64 (its Triton tutorial), checked to
# compile without register spills for sm_90 with the Philox draws in (tests/test_kernels_compile.py prints them)
_FP32 = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
GPU_FWD = {"16bit": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2), "fp32": _FP32}
GPU_DKDV = {"16bit": dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2), "fp32": _FP32}
GPU_DQ = {"16bit": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2), "fp32": _FP32}
GPU_DELTA = {k: dict(BLOCK_M=64, num_warps=4) for k in ("16bit", "fp32")}
INTERPRET_FWD = dict(BLOCK_M=64, BLOCK_N=64)
INTERPRET_DKDV = dict(BLOCK_M=64, BLOCK_N=64)
INTERPRET_DQ = dict(BLOCK_M=64, BLOCK_N=64)
INTERPRET_DELTA = dict(BLOCK_M=128)


@triton.jit
def _visible(seed, rows, cols, wid, length, p_dec, SEP_VISIBLE: tl.constexpr):
    """`philox.decoder_visibility` for the broadcast (rows, cols) of a tile; wid: the word ids of cols."""
    u = tl.rand(seed, rows * _WORD_STRIDE + wid)
    always = cols == 0
    if SEP_VISIBLE:
        always = always | (cols == length - 1)
    return ((u >= p_dec) | always) & (cols < length) & (cols != rows)


@triton.jit
def _kept(seed, rows, cols, L, dropout_p):
    """`philox.attention_dropout_keep` for a tile of one (sample, head), whose seed is given."""
    return tl.rand(seed, rows * L + cols) >= dropout_p


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, seeds_ptr, wid_ptr, len_ptr, consts_ptr,
                     L, NH, HD, p_dec, dropout_p, dropout_seed,
                     sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod, swb,
                     SEP_VISIBLE: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_in = offs_d < HD
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * sqb + h * sqh + rows[:, None] * sql + offs_d[None, :] * sqd,
                mask=(rows[:, None] < L) & d_in[None, :], other=0.0)
    k_base = k_ptr + b64 * skb + h * skh
    v_base = v_ptr + b64 * svb + h * svh
    seed = tl.load(seeds_ptr + b)
    length = tl.load(len_ptr + b)
    qk_scale = tl.load(consts_ptr)  # softmax scale * log2(e)
    inv_keep = tl.load(consts_ptr + 2)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_M,), ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for n0 in range(0, length, BLOCK_N):
        cols = n0 + offs_n
        c_in = cols < L
        kt = tl.load(k_base + cols[None, :] * skl + offs_d[:, None] * skd, mask=c_in[None, :] & d_in[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION, out_dtype=ACC) * qk_scale
        wid = tl.load(wid_ptr + b64 * swb + cols, mask=c_in, other=0)
        vis = _visible(seed, rows[:, None], cols[None, :], wid[None, :], length, p_dec, SEP_VISIBLE)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            p = tl.where(_kept(dropout_seed + bh, rows[:, None], cols[None, :], L, dropout_p), p * inv_keep, 0.0)
        vt = tl.load(v_base + cols[:, None] * svl + offs_d[None, :] * svd, mask=c_in[:, None] & d_in[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new
    seen = l_i > 0
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    r_in = rows < L
    tl.store(o_ptr + b64 * sob + h * soh + rows[:, None] * sol + offs_d[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=r_in[:, None] & d_in[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * L + rows, lse, mask=r_in)


@triton.jit
def _attn_delta_kernel(o_ptr, do_ptr, delta_ptr, L, NH, HD,
                       sob, soh, sol, sod, sgb, sgh, sgl, sgd,
                       ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, i] = sum_d dO * O: the softmax backward's row term."""
    bh = tl.program_id(1)
    b = (bh // NH).to(tl.int64)
    h = bh % NH
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < L) & (offs_d[None, :] < HD)
    o = tl.load(o_ptr + b * sob + h * soh + rows[:, None] * sol + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(do_ptr + b * sgb + h * sgh + rows[:, None] * sgl + offs_d[None, :] * sgd, mask=mask, other=0.0)
    delta = tl.sum(o.to(ACC) * do.to(ACC), axis=1)
    tl.store(delta_ptr + bh.to(tl.int64) * L + rows, delta, mask=rows < L)


@triton.jit
def _attn_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                      seeds_ptr, wid_ptr, len_ptr, consts_ptr,
                      L, NH, HD, p_dec, dropout_p, dropout_seed,
                      sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sgb, sgh, sgl, sgd,
                      sdkb, sdkh, sdkl, sdkd, sdvb, sdvh, sdvl, sdvd, swb,
                      SEP_VISIBLE: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK and dV of BLOCK_N keys, summed over every query block (transposed tiles: keys x queries)."""
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    b64 = b.to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    d_in = offs_d < HD
    c_in = cols < L
    kv_mask = c_in[:, None] & d_in[None, :]
    k = tl.load(k_ptr + b64 * skb + h * skh + cols[:, None] * skl + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b64 * svb + h * svh + cols[:, None] * svl + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    wid = tl.load(wid_ptr + b64 * swb + cols, mask=c_in, other=0)
    seed = tl.load(seeds_ptr + b)
    length = tl.load(len_ptr + b)
    qk_scale = tl.load(consts_ptr)
    scale = tl.load(consts_ptr + 1)
    inv_keep = tl.load(consts_ptr + 2)
    q_base = q_ptr + b64 * sqb + h * sqh
    do_base = do_ptr + b64 * sgb + h * sgh
    stat_base = bh.to(tl.int64) * L
    dk = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    dv = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    m_end = tl.where(tl.program_id(0) * BLOCK_N < length, L, 0)  # keys past the length: never visible
    for m0 in range(0, m_end, BLOCK_M):
        rows = m0 + offs_m
        r_in = rows < L
        qt = tl.load(q_base + rows[None, :] * sql + offs_d[:, None] * sqd, mask=r_in[None, :] & d_in[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * sgl + offs_d[None, :] * sgd, mask=r_in[:, None] & d_in[None, :], other=0.0)
        lse = tl.load(lse_ptr + stat_base + rows, mask=r_in, other=float("inf"))
        delta = tl.load(delta_ptr + stat_base + rows, mask=r_in, other=0.0)
        st = tl.dot(k, qt, input_precision=PRECISION, out_dtype=ACC) * qk_scale
        vis = _visible(seed, rows[None, :], cols[:, None], wid[:, None], length, p_dec, SEP_VISIBLE)
        pt = tl.where(vis, tl.exp2(st - lse[None, :]), 0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION, out_dtype=ACC)
        if DROPOUT:
            keep = _kept(dropout_seed + bh, rows[None, :], cols[:, None], L, dropout_p)
            dv += tl.dot(tl.where(keep, pt * inv_keep, 0.0).to(do.dtype), do, input_precision=PRECISION, out_dtype=ACC)
            dpt = tl.where(keep, dpt * inv_keep, 0.0)
        else:
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION, out_dtype=ACC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION, out_dtype=ACC)
    dk = dk * scale
    tl.store(dk_ptr + b64 * sdkb + h * sdkh + cols[:, None] * sdkl + offs_d[None, :] * sdkd,
             dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + b64 * sdvb + h * sdvh + cols[:, None] * sdvl + offs_d[None, :] * sdvd,
             dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                    seeds_ptr, wid_ptr, len_ptr, consts_ptr,
                    L, NH, HD, p_dec, dropout_p, dropout_seed,
                    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sgb, sgh, sgl, sgd,
                    sdqb, sdqh, sdql, sdqd, swb,
                    SEP_VISIBLE: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ of BLOCK_M query rows, summed over the key blocks up to the length."""
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    b64 = b.to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_in = offs_d < HD
    r_in = rows < L
    q_mask = r_in[:, None] & d_in[None, :]
    q = tl.load(q_ptr + b64 * sqb + h * sqh + rows[:, None] * sql + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + b64 * sgb + h * sgh + rows[:, None] * sgl + offs_d[None, :] * sgd, mask=q_mask, other=0.0)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * L + rows, mask=r_in, other=float("inf"))
    delta = tl.load(delta_ptr + bh.to(tl.int64) * L + rows, mask=r_in, other=0.0)
    seed = tl.load(seeds_ptr + b)
    length = tl.load(len_ptr + b)
    qk_scale = tl.load(consts_ptr)
    scale = tl.load(consts_ptr + 1)
    inv_keep = tl.load(consts_ptr + 2)
    k_base = k_ptr + b64 * skb + h * skh
    v_base = v_ptr + b64 * svb + h * svh
    dq = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for n0 in range(0, length, BLOCK_N):
        cols = n0 + offs_n
        c_in = cols < L
        kt = tl.load(k_base + cols[None, :] * skl + offs_d[:, None] * skd, mask=c_in[None, :] & d_in[:, None], other=0.0)
        vt = tl.load(v_base + cols[None, :] * svl + offs_d[:, None] * svd, mask=c_in[None, :] & d_in[:, None], other=0.0)
        wid = tl.load(wid_ptr + b64 * swb + cols, mask=c_in, other=0)
        s = tl.dot(q, kt, input_precision=PRECISION, out_dtype=ACC) * qk_scale
        vis = _visible(seed, rows[:, None], cols[None, :], wid[None, :], length, p_dec, SEP_VISIBLE)
        p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION, out_dtype=ACC)
        if DROPOUT:
            keep = _kept(dropout_seed + bh, rows[:, None], cols[None, :], L, dropout_p)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION, out_dtype=ACC)
    dq = dq * scale
    tl.store(dq_ptr + b64 * sdqb + h * sdqh + rows[:, None] * sdql + offs_d[None, :] * sdqd,
             dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


class _DecoderAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seeds, word_ids, lengths, p_dec, dropout_p, sep_visible):
        B, H, L, d = q.shape
        acc = acc_dtype(q.dtype)
        scale = 1.0 / math.sqrt(d)
        dropout = dropout_p > 0.0
        dropout_seed = int(torch.randint(0, 1 << 62, (1,)).item()) if dropout else 0
        consts = torch.tensor([scale * math.log2(math.e), scale, 1.0 / (1.0 - dropout_p)], dtype=acc, device=q.device)
        wid = word_ids.to(torch.int32).contiguous()
        seeds = seeds.to(torch.int64).contiguous()
        lens = lengths.to(torch.int32).contiguous()
        # (B, L, H, d) memory seen as (B, H, L, d): the caller's transpose(1, 2).reshape is then free
        out = torch.empty(B, L, H, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty(B, H, L, dtype=acc, device=q.device)
        common = dict(SEP_VISIBLE=bool(sep_visible), DROPOUT=dropout, ACC=tl_dtype(acc),
                      PRECISION=dot_precision(q.dtype), BLOCK_D=max(16, triton.next_power_of_2(d)))
        blocks, opts = launch_config(q, GPU_FWD, INTERPRET_FWD)
        if out.numel():
            _attn_fwd_kernel[(triton.cdiv(L, blocks["BLOCK_M"]), B * H)](
                q, k, v, out, lse, seeds, wid, lens, consts, L, H, d, float(p_dec), float(dropout_p), dropout_seed,
                *_strides(q), *_strides(k), *_strides(v), *_strides(out), wid.stride(0),
                **common, **blocks, **opts)
        ctx.save_for_backward(q, k, v, out, lse, seeds, wid, lens, consts)
        ctx.args = (float(p_dec), float(dropout_p), dropout_seed, common)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, seeds, wid, lens, consts = ctx.saved_tensors
        p_dec, dropout_p, dropout_seed, common = ctx.args
        B, H, L, d = q.shape
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if not q.numel():
            return dq, dk, dv, None, None, None, None, None, None
        delta = torch.empty_like(lse)
        blocks, opts = launch_config(q, GPU_DELTA, INTERPRET_DELTA)
        _attn_delta_kernel[(triton.cdiv(L, blocks["BLOCK_M"]), B * H)](
            out, dout, delta, L, H, d, *_strides(out), *_strides(dout),
            ACC=common["ACC"], BLOCK_D=common["BLOCK_D"], **blocks, **opts)
        scalars = (L, H, d, p_dec, dropout_p, dropout_seed)
        strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
        blocks, opts = launch_config(q, GPU_DKDV, INTERPRET_DKDV)
        _attn_dkdv_kernel[(triton.cdiv(L, blocks["BLOCK_N"]), B * H)](
            q, k, v, dout, lse, delta, dk, dv, seeds, wid, lens, consts, *scalars, *strides,
            *_strides(dk), *_strides(dv), wid.stride(0), **common, **blocks, **opts)
        blocks, opts = launch_config(q, GPU_DQ, INTERPRET_DQ)
        _attn_dq_kernel[(triton.cdiv(L, blocks["BLOCK_M"]), B * H)](
            q, k, v, dout, lse, delta, dq, seeds, wid, lens, consts, *scalars, *strides,
            *_strides(dq), wid.stride(0), **common, **blocks, **opts)
        return dq, dk, dv, None, None, None, None, None, None


def decoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seeds: torch.Tensor,
                      word_ids: torch.Tensor, lengths: torch.Tensor, p_dec: float = 0.5, dropout_p: float = 0.0,
                      sep_always_visible: bool = True, row_chunk: int | None = None) -> torch.Tensor:
    """`reference.decoder_attention` computed by Triton kernels: the same arguments, mask and results;
    dropout draws differ (see the module docstring). `row_chunk` is the reference's chunking, ignored here."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"decoder_attention: q, k, v must all be (B, H, L, d), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"decoder_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] > philox.MAX_POSITIONS:
        raise ValueError(f"sequence length {q.shape[2]} exceeds {philox.MAX_POSITIONS}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if interpreting(q):
        (q, k, v), restore = upcast_for_interpreter(q, k, v)
        return restore(_DecoderAttention.apply(q, k, v, seeds, word_ids, lengths, p_dec, dropout_p,
                                               sep_always_visible))
    return _DecoderAttention.apply(q, k, v, seeds, word_ids, lengths, p_dec, dropout_p, sep_always_visible)
