"""Philox4x32-10 in plain PyTorch, bit-identical to Triton's `tl.randint4x` / `tl.rand`, and the
enhanced decoder's visibility rule built on it.

This module is the one definition of every random decision DupMAE makes from (seed, epoch, sample id):
the data pipeline draws its encoder masks with it, the reference attention path builds explicit masks
with it, and the Triton attention kernel regenerates the same decoder masks inside the kernel with
`tl.rand(seed, row * WORD_STRIDE + word_id)`.

Arithmetic is done on int64 tensors that hold uint32 values: a 32 x 32 -> 64 bit product wraps in
two's complement exactly like uint64, so the high and low words come out right after masking. It runs
on any device and needs no uint32 support from torch.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10
# tl.rand: int32 bits -> [0, 1) float32 by `x * 4.6566127342e-10` after folding negatives.
_UNIFORM_SCALE = 4.6566127342e-10

# Draws per query row are indexed by word id; rows are this far apart in the Philox counter space, so
# any sequence shorter than 32,768 tokens gets distinct, non-negative int32 offsets.
WORD_STRIDE = 1 << 16
MAX_POSITIONS = 1 << 15

# Stream selectors (third counter word) for per-sample keys derived from the run seed.
DOMAIN_ENCODER = 1
DOMAIN_DECODER = 2


def _umulhi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    prod = b * a  # exact low 64 bits, wrapping like uint64
    return (prod >> 32) & MASK32, prod & MASK32


def philox4x32(k0, k1, c0, c1, c2, c3, n_rounds: int = N_ROUNDS):
    """Philox4x32 with key (k0, k1) and counter (c0..c3), all int64 tensors holding uint32 values
    (broadcastable). Returns four int64 tensors holding uint32 values, as Triton's `philox`."""
    k0 = k0 & MASK32
    k1 = k1 & MASK32
    for _ in range(n_rounds):
        hi_b, lo_b = _umulhi_lo(_ROUND_B, c2)
        hi_a, lo_a = _umulhi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & MASK32
        k1 = (k1 + _KEY_B) & MASK32
    return c0, c1, c2, c3


def split_seed(seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A non-negative int64 seed -> (low, high) 32-bit key words, as `tl.rand` splits its seed."""
    return seed & MASK32, (seed >> 32) & MASK32


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's `uint_to_uniform_float` for 32-bit draws: float32 in [0, 1)."""
    signed = torch.where(x >= 1 << 31, x - (1 << 32), x)
    folded = torch.where(signed < 0, -signed - 1, signed).to(torch.int32)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def rand(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """`tl.rand(seed, offset)` for an int64 seed tensor and int32/int64 offsets (broadcastable)."""
    k0, k1 = split_seed(seed.to(torch.int64))
    offset = offset.to(torch.int64) & MASK32
    zero = torch.zeros_like(offset)
    c0, _, _, _ = philox4x32(k0, k1, offset, zero, zero, zero)
    return uint32_to_uniform(c0)


def derive_sample_keys(seed: int, sample_ids: torch.Tensor, domain: int,
                       epochs: int | torch.Tensor = 0) -> torch.Tensor:
    """Per-sample 63-bit keys as a pure function of (run seed, sample id, stream, epoch): Philox keyed by the
    run seed over the counter (sample id low, sample id high, domain, epoch). `epochs`: one int for all
    samples or one per sample, in [0, 2**32); every epoch gives a sample new keys."""
    if not 0 <= seed < 1 << 63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    ids = sample_ids.to(torch.int64)
    if bool((ids < 0).any()):
        raise ValueError("sample ids must be non-negative")
    ep = torch.as_tensor(epochs, dtype=torch.int64, device=ids.device)
    if bool(((ep < 0) | (ep > MASK32)).any()):
        raise ValueError("epochs must be in [0, 2**32)")
    s = torch.tensor(seed, dtype=torch.int64, device=ids.device)
    k0, k1 = split_seed(s)
    lo, hi = ids & MASK32, (ids >> 32) & MASK32
    dom = torch.full_like(ids, domain)
    c0, c1, _, _ = philox4x32(k0, k1, lo, hi, dom, ep.expand_as(ids))
    return ((c1 & 0x7FFFFFFF) << 32) | c0


def decoder_visibility(
    seeds: torch.Tensor,
    word_ids: torch.Tensor,
    lengths: torch.Tensor,
    p_dec: float,
    rows: slice | None = None,
    sep_always_visible: bool = True,
) -> torch.Tensor:
    """The enhanced decoder's attention mask: True where query row i may see key j.

    seeds: (B,) int64 decoder seeds; word_ids: (B, L) word index of every position (any value at
    padding); lengths: (B,) number of real positions ([CLS] ... [SEP]). `rows` selects a block of query
    rows so callers can build the mask a chunk at a time. Returns (B, R, L) bool.

    Rule, per query row i: key i is never visible; key 0 ([CLS]) and key len-1 (the final [SEP]) are
    always visible otherwise; padding never; every other key j is hidden with probability p_dec, drawn
    once per (row, word): rand(seed, i * WORD_STRIDE + word_ids[j]) < p_dec hides the whole word.
    With `sep_always_visible=False` the final [SEP] is drawn like a word (its own word id).
    """
    B, L = word_ids.shape
    if L > MAX_POSITIONS:
        raise ValueError(f"sequence length {L} exceeds {MAX_POSITIONS}")
    rows = rows or slice(0, L)
    device = word_ids.device
    i = torch.arange(L, device=device)[rows]  # (R,)
    j = torch.arange(L, device=device)
    offsets = i[None, :, None] * WORD_STRIDE + word_ids.to(torch.int64)[:, None, :]  # (B, R, L)
    u = rand(seeds.to(torch.int64)[:, None, None], offsets)
    threshold = torch.tensor(p_dec, dtype=torch.float32, device=device)
    visible = u >= threshold
    last = (lengths.to(torch.int64) - 1)[:, None, None]
    always = j[None, None, :] == 0
    if sep_always_visible:
        always = always | (j[None, None, :] == last)
    visible = visible | always
    visible &= j[None, None, :] < lengths.to(torch.int64)[:, None, None]
    visible &= j[None, None, :] != i[None, :, None]
    return visible


def attention_dropout_keep(seed: int, batch: int, heads: int, length: int, p: float,
                           device: torch.device | str = "cpu") -> torch.Tensor:
    """The Triton attention's probability dropout, as an explicit (B, H, L, L) bool tensor (True: kept).

    Head h of sample b draws with the seed `seed + b * heads + h` and counter `i * length + j` for query row i
    and key j: kept where rand >= p (p rounded to float32, as a kernel argument is). `seed` comes from torch's
    generator once per call, so torch.manual_seed makes the draws reproducible."""
    if length * length >= 1 << 31:
        raise ValueError(f"sequence length {length} too long for 32-bit dropout counters")
    bh = torch.arange(batch * heads, device=device, dtype=torch.int64).reshape(batch, heads, 1, 1) + seed
    i = torch.arange(length, device=device, dtype=torch.int64)
    u = rand(bh, i[:, None] * length + i[None, :])
    return u >= torch.tensor(p, dtype=torch.float32, device=device)
