"""Triton `bow_max_pool`: the vocabulary projection of every position, max-pooled over the sequence, in one
pass that never writes the B x L x V logits; and its backward from dmu (B x V) and the saved argmax.

Forward, one program per (sample b, block of BLOCK_V words): for each block of BLOCK_L positions up to the
sample's last valid one, a BLOCK_V x BLOCK_L tile of logits (words x positions: the max then reduces along
the dot's columns, inside threads, not across warps) is accumulated over D with `tl.dot` (fp32, or fp64 for
fp64 inputs), the bias added, invalid positions set to -inf, and the running max and its first argmax
updated. Programs are ordered sample-fastest, so the B programs of one word block read the same
weight tiles while they are in L2.

Backward, with no atomics and a fixed summation order (bit-for-bit deterministic):
- dW[v] = sum_b dmu[b, v] * hidden[b, argmax[b, v]] and db[v] = sum_b dmu[b, v]: one program per block of
  words gathers the B chosen rows, b = 0..B-1 in order.
- dhidden[b, l] = sum over the words v whose max sits at (b, l) of dmu[b, v] * W[v]: the (b, v) entries are
  sorted by their position b * L + argmax (a stable sort, so v ascending within a position) into CSR rows,
  and one program per position sums its rows of W. Work is O(B x V x D), not the O(B x L x V x D) of
  differentiating full logits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_util import (acc_dtype, dot_precision, interpreting, launch_config, tl_dtype,
                           upcast_for_interpreter)

# GPU launch settings, chosen to compile without register spills for sm_90 at BERT-base shapes (registers and
# stack bytes are printed by tests/test_kernels_compile.py, which compiles exactly these for sm_80 and sm_90)
GPU_FWD = {"16bit": dict(BLOCK_L=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=4),
           "fp32": dict(BLOCK_L=64, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=2)}
# Sequences of at most SHORT positions use 64-position tiles: with 128 the last tile of a sample is mostly
# padding (L=150 computes 256 rows for ~130 valid ones) and the tile holds more registers (173-196 against 120:
# two programs per SM instead of one). benchmarks/sass_model.py predicts 1.70 -> 1.38 ms for the forward at
# B=128, L=150 and no change at L=512, where 128-position tiles stay (the larger dot, the common GEMM tile).
SHORT = 256
GPU_FWD_SHORT = dict(GPU_FWD, **{"16bit": dict(BLOCK_L=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=4)})
GPU_DWEIGHT = {k: dict(BLOCK_V=64, BLOCK_D=128, num_warps=4, num_stages=2) for k in ("16bit", "fp32")}
GPU_DHIDDEN = {k: dict(BLOCK_N=32, BLOCK_D=256, num_warps=4, num_stages=2) for k in ("16bit", "fp32")}
# Interpreter settings: each program instance costs about a millisecond of Python, so few and large
INTERPRET_FWD = dict(BLOCK_L=128, BLOCK_V=512, BLOCK_D=128)
INTERPRET_DWEIGHT = dict(BLOCK_V=512, BLOCK_D=128)
INTERPRET_DHIDDEN = dict(BLOCK_N=128, BLOCK_D=128)


@triton.jit
def _bow_fwd_kernel(h_ptr, w_ptr, bias_ptr, valid_ptr, end_ptr, mu_ptr, arg_ptr,
                    L, V, D,
                    stride_hb, stride_hl, stride_hd, stride_wv, stride_wd, stride_vb, stride_mb,
                    HAS_BIAS: tl.constexpr, LOWEST: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_in = offs_v < V
    offs_l0 = tl.arange(0, BLOCK_L)
    offs_d0 = tl.arange(0, BLOCK_D)
    h_base = h_ptr + b.to(tl.int64) * stride_hb
    end = tl.load(end_ptr + b)  # 1 + the last valid position (0: none)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_v, mask=v_in, other=0.0).to(ACC)
    best = tl.full((BLOCK_V,), float("-inf"), ACC)
    arg = tl.zeros((BLOCK_V,), tl.int32)
    for l0 in range(0, end, BLOCK_L):
        offs_l = l0 + offs_l0
        # the tile is computed transposed, words x positions, so that the max over positions runs along the
        # accumulator's columns: within a thread and a lane quad, not across warps through shared memory
        logits = tl.zeros((BLOCK_V, BLOCK_L), ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_d0
            w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                        mask=v_in[:, None] & (offs_d[None, :] < D), other=0.0)
            ht = tl.load(h_base + offs_l[None, :] * stride_hl + offs_d[:, None] * stride_hd,
                         mask=(offs_l[None, :] < L) & (offs_d[:, None] < D), other=0.0)
            logits = tl.dot(w, ht, logits, input_precision=PRECISION, out_dtype=ACC)
        if HAS_BIAS:
            logits += bias[:, None]
        ok = tl.load(valid_ptr + b * stride_vb + offs_l, mask=offs_l < L, other=0) != 0
        logits = tl.where(ok[None, :], logits, float("-inf"))
        tile_best, tile_arg = tl.max(logits, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best  # strict: the first position wins a tie, as torch.max does
        best = tl.where(better, tile_best, best)
        arg = tl.where(better, tile_arg + l0, arg)
    mu = tl.where(best == float("-inf"), LOWEST, best)  # no valid position: the dtype's lowest, argmax 0
    tl.store(mu_ptr + b * stride_mb + offs_v, mu.to(mu_ptr.dtype.element_ty), mask=v_in)
    tl.store(arg_ptr + b * stride_mb + offs_v, arg.to(tl.int64), mask=v_in)


@triton.jit
def _bow_dweight_kernel(h_ptr, dmu_ptr, arg_ptr, dw_ptr, db_ptr,
                        B, V, D,
                        stride_hb, stride_hl, stride_hd, stride_gb, stride_dwv, stride_dwd,
                        HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    v_in = offs_v < V
    d_in = offs_d < D
    dw = tl.zeros((BLOCK_V, BLOCK_D), ACC)
    db = tl.zeros((BLOCK_V,), ACC)
    h_b = h_ptr  # advanced by whole samples (pointer arithmetic is 64-bit)
    for b in range(0, B):
        g = tl.load(dmu_ptr + b * stride_gb + offs_v, mask=v_in, other=0.0).to(ACC)
        pos = tl.load(arg_ptr + b * stride_gb + offs_v, mask=v_in, other=0)
        h = tl.load(h_b + pos[:, None] * stride_hl + offs_d[None, :] * stride_hd,
                    mask=v_in[:, None] & d_in[None, :], other=0.0).to(ACC)
        dw += g[:, None] * h
        db += g
        h_b += stride_hb
    tl.store(dw_ptr + offs_v[:, None] * stride_dwv + offs_d[None, :] * stride_dwd,
             dw.to(dw_ptr.dtype.element_ty), mask=v_in[:, None] & d_in[None, :])
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            tl.store(db_ptr + offs_v, db.to(db_ptr.dtype.element_ty), mask=v_in)


@triton.jit
def _bow_dhidden_kernel(w_ptr, row_start_ptr, cols_ptr, vals_ptr, dh_ptr,
                        L, D,
                        stride_wv, stride_wd, stride_dhb, stride_dhl, stride_dhd,
                        ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0)  # position b * L + l
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    start = tl.load(row_start_ptr + r)
    stop = tl.load(row_start_ptr + r + 1)
    dh = tl.zeros((BLOCK_D,), ACC)
    for i0 in range(start, stop, BLOCK_N):
        idx = i0 + tl.arange(0, BLOCK_N)
        live = idx < stop
        v = tl.load(cols_ptr + idx, mask=live, other=0)
        g = tl.load(vals_ptr + idx, mask=live, other=0.0).to(ACC)
        w = tl.load(w_ptr + v[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                    mask=live[:, None] & d_in[None, :], other=0.0).to(ACC)
        dh += tl.sum(g[:, None] * w, axis=0)
    b = r // L
    pos = r % L
    tl.store(dh_ptr + b.to(tl.int64) * stride_dhb + pos * stride_dhl + offs_d * stride_dhd,
             dh.to(dh_ptr.dtype.element_ty), mask=d_in)


class _BowMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, valid, lowest):
        B, L, D = hidden.shape
        V = weight.shape[0]
        acc = acc_dtype(hidden.dtype)
        mu = torch.empty(B, V, dtype=hidden.dtype, device=hidden.device)
        argmax = torch.empty(B, V, dtype=torch.long, device=hidden.device)
        valid8 = valid.to(torch.uint8).contiguous()
        positions = torch.arange(1, L + 1, dtype=torch.int32, device=hidden.device)
        end = (valid8 * positions).amax(dim=1).to(torch.int32)  # loops stop at the last valid position
        blocks, opts = launch_config(hidden, GPU_FWD_SHORT if L <= SHORT else GPU_FWD, INTERPRET_FWD)
        if B and V:
            grid = (B, triton.cdiv(V, blocks["BLOCK_V"]))
            _bow_fwd_kernel[grid](
                hidden, weight, bias if bias is not None else weight, valid8, end, mu, argmax,
                L, V, D,
                hidden.stride(0), hidden.stride(1), hidden.stride(2), weight.stride(0), weight.stride(1),
                valid8.stride(0), mu.stride(0),
                HAS_BIAS=bias is not None, LOWEST=lowest, ACC=tl_dtype(acc),
                PRECISION=dot_precision(hidden.dtype), **blocks, **opts)
        ctx.save_for_backward(hidden, weight, argmax)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(argmax)
        return mu, argmax

    @staticmethod
    def backward(ctx, dmu, _dargmax):
        hidden, weight, argmax = ctx.saved_tensors
        B, L, D = hidden.shape
        V = weight.shape[0]
        acc = tl_dtype(acc_dtype(hidden.dtype))
        dmu = dmu.contiguous()
        dhidden = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dhidden = torch.empty_like(hidden)
            if dhidden.numel():
                key = (torch.arange(B, device=argmax.device)[:, None] * L + argmax).reshape(-1)
                sorted_key, order = torch.sort(key, stable=True)
                row_start = torch.searchsorted(sorted_key, torch.arange(B * L + 1, device=key.device)).to(torch.int32)
                cols = (order % V).to(torch.int32)
                vals = dmu.reshape(-1)[order]
                blocks, opts = launch_config(hidden, GPU_DHIDDEN, INTERPRET_DHIDDEN)
                grid = (B * L, triton.cdiv(D, blocks["BLOCK_D"]))
                _bow_dhidden_kernel[grid](
                    weight, row_start, cols, vals, dhidden, L, D,
                    weight.stride(0), weight.stride(1), dhidden.stride(0), dhidden.stride(1), dhidden.stride(2),
                    ACC=acc, **blocks, **opts)
        want_w, want_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        if want_w or want_b:
            dweight = torch.empty_like(weight, memory_format=torch.contiguous_format)
            dbias = torch.empty(V, dtype=weight.dtype, device=weight.device) if ctx.has_bias else None
            if V and D:
                blocks, opts = launch_config(hidden, GPU_DWEIGHT, INTERPRET_DWEIGHT)
                grid = (triton.cdiv(V, blocks["BLOCK_V"]), triton.cdiv(D, blocks["BLOCK_D"]))
                _bow_dweight_kernel[grid](
                    hidden, dmu, argmax, dweight, dbias if dbias is not None else dweight,
                    B, V, D,
                    hidden.stride(0), hidden.stride(1), hidden.stride(2), dmu.stride(0),
                    dweight.stride(0), dweight.stride(1),
                    HAS_BIAS=ctx.has_bias, ACC=acc, **blocks, **opts)
            elif dbias is not None:
                dbias.copy_(dmu.sum(0))
        return dhidden, dweight if want_w else None, dbias if want_b else None, None, None


def bow_max_pool(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, valid: torch.Tensor,
                 vocab_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.bow_max_pool` computed by Triton kernels (same arguments, results and gradients).
    `vocab_chunk` is the reference's chunk size and is ignored here."""
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"bow_max_pool: hidden (B, L, D) and weight (V, D), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.shape[1] == 0:
        raise ValueError("bow_max_pool: the sequence is empty (L = 0)")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"bow_max_pool: hidden, weight and bias must share a dtype, got {hidden.dtype}, "
                        f"{weight.dtype}, {None if bias is None else bias.dtype}")
    lowest = torch.finfo(hidden.dtype).min  # of the caller's dtype, also when the interpreter computes in fp32
    if interpreting(hidden):
        args, restore = upcast_for_interpreter(hidden, weight, bias)
        mu, argmax = _BowMaxPool.apply(*args, valid.bool(), lowest)
        return restore(mu), argmax
    return _BowMaxPool.apply(hidden, weight, bias, valid.bool(), lowest)
