"""The DupMAE collator: samples -> one batch of tensors, every random choice a function of (seed, epoch, id).

Input: a list of `(sample_id, token_ids, epoch)` as `EpochSamples` serves the training split, or of
`(sample_id, token_ids)` as the datasets return them (epoch 0: the held-out evaluation's fixed masks). A sample
seen again in a later epoch gets new encoder and decoder masks, as in the reference, where the collator draws
them anew each time. Output (B rows, L columns, L the longest sample + 2, optionally rounded up to a multiple
of 8):

    input_ids          (B, L) int64   encoder input: [CLS] tokens [SEP] [PAD].., whole-word masked
    attention_mask     (B, L) int64   1 on [CLS] .. [SEP]
    labels             (B, L) int64   original id at encoder-masked positions, -100 elsewhere (a special id in
                                      the text, [UNK] in practice, is never masked nor labelled, but counts
                                      toward the whole-word budget, as in the reference)
    decoder_input_ids  (B, L) int64   the ORIGINAL (unmasked) ids, for the decoder's key/value stream
    decoder_labels     (B, L) int64   original id at every ordinary position, -100 on [CLS]/[SEP]/[PAD]
    word_ids           (B, L) int32   0 on [CLS], 1.. per whole word (a "##" piece joins the word before it),
                                      n_words + 1 on [SEP], 0 on padding
    lengths            (B,)   int64   real positions per row ([CLS] .. [SEP])
    decoder_seeds      (B,)   int64   seed of the decoder's per-row visibility masks
    bow_ids            (B, U) int64   distinct ids of the sample's text, padded with 0
    bow_mask           (B, U) bool    which bow_ids are real
    bow_counts         (B,)   int64   n: number of text tokens counted with repeats (the 1/n of L_bow)
    sample_ids         (B,)   int64
    epochs             (B,)   int64   the epoch each sample's masks were drawn for

No B x L x L mask and no B x V tensor is built, and there is no per-token Python loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dupmae.kernels.philox import DOMAIN_DECODER, derive_sample_keys

from .masks import encoder_draws, whole_word_mask
from .tokenizer import TokenizerInfo


@dataclass
class DupMAECollator:
    tokenizer: TokenizerInfo
    seed: int = 0
    max_len: int = 512
    encoder_mask_prob: float = 0.3
    mask_token_share: float = 0.8
    random_token_share: float = 0.1
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.encoder_mask_prob < 1.0:
            raise ValueError(f"encoder_mask_prob must be in (0, 1), got {self.encoder_mask_prob}")
        if self.mask_token_share + self.random_token_share > 1.0:
            raise ValueError("mask_token_share + random_token_share must not exceed 1")
        self._continues = np.asarray(self.tokenizer.continues_word, dtype=bool)
        self._special = np.zeros(max(len(self._continues), max(self.tokenizer.special_ids, default=-1) + 1), bool)
        self._special[list(self.tokenizer.special_ids)] = True

    def __call__(self, samples: list[tuple[int, np.ndarray]]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        B = len(samples)
        sample_ids = np.fromiter((s[0] for s in samples), dtype=np.int64, count=B)
        epochs = np.fromiter((s[2] if len(s) > 2 else 0 for s in samples), dtype=np.int64, count=B)
        text_lens = np.fromiter((len(s[1]) for s in samples), dtype=np.int64, count=B)
        if B == 0:
            raise ValueError("empty batch")
        too_long = np.flatnonzero(text_lens + 2 > self.max_len)
        if too_long.size:
            i = int(too_long[0])
            raise ValueError(f"sample {int(sample_ids[i])} has {int(text_lens[i])} tokens: longer than max_len "
                             f"{self.max_len} - 2; prepare the data with --max-len {self.max_len} or less")
        lengths = text_lens + 2
        L = int(lengths.max())
        if self.pad_to_multiple_of:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        col = np.arange(L)[None, :]

        ids = np.full((B, L), tok.pad_id, dtype=np.int64)
        flat = np.concatenate([np.asarray(s[1], dtype=np.int64) for s in samples])
        rows = np.repeat(np.arange(B), text_lens)
        starts = np.repeat(np.cumsum(text_lens) - text_lens, text_lens)
        ids[rows, np.arange(flat.size) - starts + 1] = flat
        ids[:, 0] = tok.cls_id
        ids[np.arange(B), lengths - 1] = tok.sep_id

        real = col < lengths[:, None]
        ordinary = real & (col > 0) & (col < (lengths - 1)[:, None])

        # word ids: an ordinary token starts a word unless it continues one; the first text token always starts
        starts_word = ordinary & ~(self._continues[ids] & (col > 1))
        word_ids = np.cumsum(starts_word, axis=1)
        n_words = word_ids[np.arange(B), lengths - 1]
        word_ids = np.where(ordinary, word_ids, 0)
        word_ids[np.arange(B), lengths - 1] = n_words + 1

        # encoder whole-word mask and 80/10/10 replacement
        draws = encoder_draws(self.seed, torch.from_numpy(sample_ids), L, torch.from_numpy(epochs))
        priority, action, random_tok, _ = (d.numpy() for d in draws)
        chosen = whole_word_mask(ordinary, word_ids, lengths, priority, self.encoder_mask_prob)
        # as the reference (HF torch_mask_tokens after its whole-word choice): special ids in the text ([UNK])
        # used up budget above, but are neither replaced nor labelled
        chosen &= ~self._special[ids]
        u = action.astype(np.float64) / 2.0**32
        to_mask = chosen & (u < self.mask_token_share)
        to_random = chosen & (u >= self.mask_token_share) & (u < self.mask_token_share + self.random_token_share)
        input_ids = np.where(to_mask, tok.mask_id, ids)
        input_ids = np.where(to_random, (random_tok * tok.vocab_size) >> 32, input_ids)
        labels = np.where(chosen, ids, -100)

        # bag of words: distinct ids of the text, compacted to the left
        sentinel = np.iinfo(np.int64).max
        srt = np.sort(np.where(ordinary, ids, sentinel), axis=1)
        first = np.ones((B, L), dtype=bool)
        first[:, 1:] = srt[:, 1:] != srt[:, :-1]
        distinct = first & (srt != sentinel)
        U = max(int(distinct.sum(axis=1).max()), 1)
        keep_order = np.argsort(~distinct, axis=1, kind="stable")[:, :U]
        bow_mask = np.take_along_axis(distinct, keep_order, axis=1)
        bow_ids = np.where(bow_mask, np.take_along_axis(srt, keep_order, axis=1), 0)

        decoder_seeds = derive_sample_keys(self.seed, torch.from_numpy(sample_ids), DOMAIN_DECODER,
                                           torch.from_numpy(epochs))
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(real.astype(np.int64)),
            "labels": torch.from_numpy(labels),
            "decoder_input_ids": torch.from_numpy(ids),
            "decoder_labels": torch.from_numpy(np.where(ordinary, ids, -100)),
            "word_ids": torch.from_numpy(word_ids.astype(np.int32)),
            "lengths": torch.from_numpy(lengths),
            "decoder_seeds": decoder_seeds,
            "bow_ids": torch.from_numpy(bow_ids),
            "bow_mask": torch.from_numpy(bow_mask),
            "bow_counts": torch.from_numpy(text_lens),
            "sample_ids": torch.from_numpy(sample_ids),
            "epochs": torch.from_numpy(epochs),
        }
