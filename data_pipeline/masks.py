"""DupMAE's random masks as pure functions of (seed, epoch, sample id), vectorized over a batch.

A sample gets new masks every time it is seen, as the reference collator draws them anew each epoch; they
stay exactly reproducible (a resumed run draws the masks the uninterrupted run would have drawn).

Encoder: whole-word masking at `mask_prob` (0.3) with 80% [MASK] / 10% random token / 10% kept, as the
reference collator (HF `DataCollatorForWholeWordMask._whole_word_mask`): the budget is
`max(1, round(len * mask_prob))` tokens with len counting [CLS] and [SEP]; words are visited in a random
order, a word that would overflow the budget is skipped, and the visit stops once the budget is met.
The loop runs over word ranks, vectorized across the batch (one step per word, not per token).
Afterwards the collator drops every special id in the text ([UNK], in practice) from the chosen set, as the
reference's `torch_mask_tokens` does: an [UNK] word uses up budget but is neither replaced nor labelled.

Decoder: the per-row visibility rule lives in `dupmae.kernels.philox.decoder_visibility`, shared with the
reference attention and the Triton kernel; `decoder_attention_mask` below builds it for a collated batch.

All draws come from Philox4x32-10 keyed per sample by `derive_sample_keys(seed, sample_id, domain, epoch)`:
the encoder uses counter (position, 0, 0, 0) and its four output words: word 0 -> the priority of word
number `position`, word 1 -> the 80/10/10 choice for the token at `position`, word 2 -> the random token.
"""
from __future__ import annotations

import numpy as np
import torch

from dupmae.kernels.philox import (
    DOMAIN_DECODER,
    DOMAIN_ENCODER,
    MASK32,
    decoder_visibility,
    derive_sample_keys,
    philox4x32,
    split_seed,
)


def encoder_draws(seed: int, sample_ids: torch.Tensor, length: int,
                  epochs: int | torch.Tensor = 0) -> tuple[torch.Tensor, ...]:
    """Four (B, length) int64 tensors of uint32 draws, one Philox evaluation per (sample, position);
    `epochs`: the epoch of every sample (one int for all, or (B,))."""
    keys = derive_sample_keys(seed, sample_ids, DOMAIN_ENCODER, epochs)
    k0, k1 = split_seed(keys[:, None])
    pos = torch.arange(length, dtype=torch.int64)[None, :].expand(len(sample_ids), length)
    zero = torch.zeros_like(pos)
    return philox4x32(k0, k1, pos, zero, zero, zero)


def whole_word_mask(
    ordinary: np.ndarray,
    word_ids: np.ndarray,
    lengths: np.ndarray,
    priority: np.ndarray,
    mask_prob: float,
) -> np.ndarray:
    """(B, L) bool: the tokens chosen for prediction.

    ordinary: (B, L) bool, maskable positions (not [CLS], [SEP], padding); word_ids: (B, L) word number
    of each position (1.. for ordinary tokens); priority: (B, L) uint32 draws, entry w ranks word w.
    """
    B, L = ordinary.shape
    n_words = np.where(ordinary, word_ids, 0).max(axis=1) if L else np.zeros(B, np.int64)
    w = np.arange(L)[None, :]
    valid_word = (w >= 1) & (w <= n_words[:, None])
    word_sizes = np.zeros((B, L + 1), dtype=np.int64)
    rows = np.broadcast_to(np.arange(B)[:, None], (B, L))
    np.add.at(word_sizes, (rows[ordinary], word_ids[ordinary]), 1)
    word_sizes = word_sizes[:, :L]
    key = np.where(valid_word, priority.astype(np.int64), np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    sizes_in_order = np.ascontiguousarray(np.take_along_axis(word_sizes, order, axis=1).T)  # (L, B)
    budget = np.maximum(1, np.round(lengths * mask_prob)).astype(np.int64)
    taken_in_order = np.zeros((L, B), dtype=bool)
    taken = np.zeros(B, dtype=np.int64)
    for k in range(int(n_words.max()) if B else 0):
        fits = taken + sizes_in_order[k] <= budget  # sizes are 0 past a row's last word
        fits &= sizes_in_order[k] > 0
        taken_in_order[k] = fits
        taken += np.where(fits, sizes_in_order[k], 0)
        if (taken >= budget).all():
            break
    taken_in_order = taken_in_order.T
    chosen_word = np.zeros((B, L), dtype=bool)
    np.put_along_axis(chosen_word, order, taken_in_order, axis=1)
    safe_ids = np.where(ordinary, word_ids, 0)
    return np.take_along_axis(chosen_word, safe_ids, axis=1) & ordinary


def decoder_attention_mask(batch: dict, p_dec: float = 0.5) -> torch.Tensor:
    """The explicit (B, L, L) bool mask of a collated batch (tests, the naive reference, small batches)."""
    return decoder_visibility(batch["decoder_seeds"], batch["word_ids"], batch["lengths"], p_dec)


__all__ = ["encoder_draws", "whole_word_mask", "decoder_attention_mask", "DOMAIN_DECODER", "MASK32"]
