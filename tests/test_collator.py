"""The DupMAE collator and its masks: reference semantics, every draw a function of (seed, epoch, sample id)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dupmae.data_pipeline.collator import DupMAECollator
from dupmae.data_pipeline.masks import decoder_attention_mask, encoder_draws, whole_word_mask
from dupmae.data_pipeline.tokenizer import load_fast_tokenizer, resolve_tokenizer_path, tokenizer_info
from dupmae.kernels.philox import decoder_visibility

CORPUS = Path(__file__).resolve().parents[1] / "data" / "wordnet" / "corpus.jsonl"


@pytest.fixture(scope="module")
def info():
    return tokenizer_info()


@pytest.fixture(scope="module")
def real_samples():
    """Real tokenized WordNet documents (title + definition), as (sample id, uint16 ids)."""
    tok = load_fast_tokenizer(str(resolve_tokenizer_path(None)))
    with open(CORPUS, encoding="utf-8") as f:
        docs = [json.loads(line) for _, line in zip(range(400), f)]
    texts = [f"{d['title']} {d['text']}" for d in docs]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return [(1000 + i, np.asarray(x, dtype=np.uint16)) for i, x in enumerate(ids) if len(x) >= 3]


def collate(info, samples, **kw):
    kw.setdefault("max_len", 512)
    return DupMAECollator(info, **kw)(samples)


def test_layout_of_a_batch(info, real_samples):
    samples = real_samples[:16]
    b = collate(info, samples, seed=3)
    B, L = b["input_ids"].shape
    assert B == 16 and L == max(len(s[1]) for s in samples) + 2
    for r, (sid, toks) in enumerate(samples):
        n = len(toks) + 2
        orig = b["decoder_input_ids"][r]
        assert orig[0] == info.cls_id and orig[n - 1] == info.sep_id
        assert orig[1 : n - 1].tolist() == toks.tolist()
        assert (orig[n:] == info.pad_id).all()
        assert b["attention_mask"][r].tolist() == [1] * n + [0] * (L - n)
        assert b["lengths"][r] == n and b["sample_ids"][r] == sid
        dl = b["decoder_labels"][r]
        assert dl[0] == -100 and dl[n - 1] == -100 and (dl[n:] == -100).all()
        assert dl[1 : n - 1].tolist() == toks.tolist()


def test_encoder_labels_and_replacements(info, real_samples):
    b = collate(info, real_samples, seed=5)
    ids, inp, labels = b["decoder_input_ids"], b["input_ids"], b["labels"]
    chosen = labels != -100
    # labels hold the original token exactly where chosen; specials and padding are never chosen
    assert torch.equal(labels[chosen], ids[chosen])
    special = (ids == info.cls_id) | (ids == info.sep_id) | (ids == info.pad_id)
    assert not (chosen & special).any()
    # positions not chosen are left as they are
    assert torch.equal(inp[~chosen], ids[~chosen])
    masked = chosen & (inp == info.mask_id)
    kept = chosen & (inp == ids)
    random = chosen & ~masked & ~kept
    total = int(chosen.sum())
    assert total > 1000
    assert abs(masked.sum().item() / total - 0.8) < 0.04
    assert abs(kept.sum().item() / total - 0.1) < 0.03 + 0.01  # a random draw may hit the same id
    assert abs(random.sum().item() / total - 0.1) < 0.03
    assert (inp[random] >= 0).all() and (inp[random] < info.vocab_size).all()


def test_whole_words_are_masked_together_within_budget(info, real_samples):
    b = collate(info, real_samples, seed=7)
    chosen = (b["labels"] != -100).numpy()
    word_ids = b["word_ids"].numpy()
    ids = b["decoder_input_ids"].numpy()
    lengths = b["lengths"].numpy()
    pieces = 0
    for r in range(len(lengths)):
        n = lengths[r]
        words = word_ids[r, 1 : n - 1]
        c = chosen[r, 1 : n - 1]
        for w in np.unique(words):
            sel = c[words == w]
            assert sel.all() or not sel.any(), "a word was partly masked"
        budget = max(1, round(n * 0.3))
        assert c.sum() <= budget
        # the reference's greedy rule: every word left out would overflow the budget
        sizes = np.bincount(words)[1:]
        chosen_words = np.unique(words[c])
        left_out = np.setdiff1d(np.unique(words), chosen_words)
        if c.sum() < budget and left_out.size:
            assert sizes[left_out - 1].min() > budget - c.sum()
        # a "##" piece joins the word before it
        toks = ids[r, 1 : n - 1]
        cont = info.continues_word[toks]
        pieces += int(cont[1:].sum())
        assert np.all(words[1:][cont[1:]] == words[:-1][cont[1:]])
        assert np.all(words[1:][~cont[1:]] == words[:-1][~cont[1:]] + 1)
        assert words[0] == 1 and word_ids[r, 0] == 0 and word_ids[r, n - 1] == words.max() + 1
    assert pieces > 50, "the sample text should contain word pieces"
    share = chosen.sum() / (lengths - 2).sum()
    assert 0.25 < share < 0.36


def test_masks_depend_on_seed_and_sample_id_only(info, real_samples):
    a = collate(info, real_samples[:8], seed=1)
    # the same samples in another order, next to other (longer) samples, padded differently
    mixed = [real_samples[20], *reversed(real_samples[:8]), max(real_samples, key=lambda s: len(s[1]))]
    b = collate(info, mixed, seed=1, pad_to_multiple_of=8)
    assert b["input_ids"].shape[1] % 8 == 0
    for r in range(8):
        rb = 8 - r
        n = int(a["lengths"][r])
        for key in ("input_ids", "labels", "word_ids"):
            assert torch.equal(a[key][r, :n], b[key][rb, :n]), key
        assert a["decoder_seeds"][r] == b["decoder_seeds"][rb]
    c = collate(info, real_samples[:8], seed=2)
    assert not torch.equal(a["labels"], c["labels"])
    assert not torch.equal(a["decoder_seeds"], c["decoder_seeds"])
    again = collate(info, real_samples[:8], seed=1)
    for key in a:
        assert torch.equal(a[key], again[key]), key


def with_epoch(samples, epoch: int):
    return [(sid, toks, epoch) for sid, toks in samples]


def test_untagged_samples_get_the_masks_of_epoch_zero(info, real_samples):
    """The held-out evaluation collates untagged samples: always epoch 0's masks."""
    a = collate(info, real_samples[:16], seed=3)
    b = collate(info, with_epoch(real_samples[:16], 0), seed=3)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (a["epochs"] == 0).all()


def test_a_sample_gets_new_masks_every_epoch(info, real_samples):
    samples = [s for s in real_samples if len(s[1]) >= 12][:64]
    assert len(samples) == 64
    by_epoch = [collate(info, with_epoch(samples, e), seed=5) for e in range(3)]
    for e, b in enumerate(by_epoch):
        assert (b["epochs"] == e).all()
        for key in ("decoder_input_ids", "decoder_labels", "word_ids", "lengths", "bow_ids", "bow_counts",
                    "sample_ids", "attention_mask"):
            assert torch.equal(b[key], by_epoch[0][key]), key  # the sample itself does not change
    for e1, e2 in ((0, 1), (0, 2), (1, 2)):
        a, b = by_epoch[e1], by_epoch[e2]
        assert (a["decoder_seeds"] != b["decoder_seeds"]).all()
        same_labels = sum(torch.equal(a["labels"][r], b["labels"][r]) for r in range(64))
        same_inputs = sum(torch.equal(a["input_ids"][r], b["input_ids"][r]) for r in range(64))
        assert same_labels <= 4 and same_inputs <= 2, (same_labels, same_inputs)
        ma, mb = decoder_attention_mask(a), decoder_attention_mask(b)
        assert all(not torch.equal(ma[r], mb[r]) for r in range(64))
    # every epoch's masks follow the same rule: whole words, same budget
    shares = [(b["labels"] != -100).sum().item() / (b["lengths"] - 2).sum().item() for b in by_epoch]
    assert max(shares) - min(shares) < 0.02, shares


def test_masks_are_a_function_of_seed_epoch_and_sample_id(info, real_samples):
    samples = real_samples[:8]
    a = collate(info, with_epoch(samples, 3), seed=1)
    # the same (epoch, id) pairs in another order, beside samples of other epochs, padded differently
    mixed = [(*real_samples[20], 0), *reversed(with_epoch(samples, 3)), (*samples[0], 4)]
    b = collate(info, mixed, seed=1, pad_to_multiple_of=8)
    for r in range(8):
        rb = 8 - r
        n = int(a["lengths"][r])
        for key in ("input_ids", "labels", "word_ids"):
            assert torch.equal(a[key][r, :n], b[key][rb, :n]), key
        assert a["decoder_seeds"][r] == b["decoder_seeds"][rb] and b["epochs"][rb] == 3
    assert b["sample_ids"][9] == b["sample_ids"][8] and b["decoder_seeds"][9] != b["decoder_seeds"][8]
    again = collate(info, with_epoch(samples, 3), seed=1)
    for key in a:
        assert torch.equal(a[key], again[key]), key


# ---- [UNK] in the text: the reference's budget, no label ---------------------------------------------------

def reference_labelled(tok, ids: list[int], word_order: list[int], mask_prob: float) -> list[bool]:
    """The positions the reference labels for one sample ([CLS] text [SEP]), its random shuffle of the words
    replaced by `word_order`: transformers 4.x `DataCollatorForWholeWordMask._whole_word_mask` on the tokens,
    as RetroMAE's collator calls it, then `torch_mask_tokens`' removal of every special token."""
    tokens = tok.convert_ids_to_tokens(ids)
    cand_indexes: list[list[int]] = []
    for i, token in enumerate(tokens):
        if token in ("[CLS]", "[SEP]"):
            continue
        if cand_indexes and token.startswith("##"):
            cand_indexes[-1].append(i)
        else:
            cand_indexes.append([i])
    num_to_predict = min(512, max(1, int(round(len(tokens) * mask_prob))))
    covered: set[int] = set()
    for index_set in (cand_indexes[w] for w in word_order):
        if len(covered) >= num_to_predict:
            break
        if len(covered) + len(index_set) > num_to_predict:
            continue
        covered.update(index_set)
    special = tok.get_special_tokens_mask(ids, already_has_special_tokens=True)
    return [i in covered and not special[i] for i in range(len(ids))]


def test_unk_uses_up_budget_but_is_never_masked_or_labelled(info, real_samples):
    tok = load_fast_tokenizer(str(resolve_tokenizer_path(None)))
    unk = tok.unk_token_id
    assert unk in info.special_ids
    with_unk = []
    for sid, toks in real_samples:
        toks = toks.copy()
        toks[6::7] = unk  # every 7th token
        with_unk.append((sid, toks, 2))
    b = collate(info, with_unk, seed=8)
    ids, inp, labels = b["decoder_input_ids"], b["input_ids"], b["labels"]
    is_unk = ids == unk
    text_tokens = int((b["lengths"] - 2).sum())
    assert is_unk.sum() > 0.1 * text_tokens
    assert (labels[is_unk] == -100).all() and (inp[is_unk] == unk).all()

    # exactly the reference's labelled set, given our random order of the words
    priority = encoder_draws(8, b["sample_ids"], ids.shape[1], b["epochs"])[0].numpy()
    for r in range(len(with_unk)):
        n = int(b["lengths"][r])
        n_words = int(b["word_ids"][r, n - 1]) - 1
        order = np.argsort(priority[r, 1 : n_words + 1], kind="stable").tolist()
        assert (labels[r, :n] != -100).tolist() == reference_labelled(tok, ids[r, :n].tolist(), order, 0.3), r

    # the budget counts [UNK]: the whole-word choice fills it as usual, the [UNK] part of it is dropped
    ordinary = b["decoder_labels"].numpy() != -100
    chosen = whole_word_mask(ordinary, b["word_ids"].numpy().astype(np.int64), b["lengths"].numpy(), priority, 0.3)
    assert torch.equal(labels != -100, torch.from_numpy(chosen) & ~is_unk)
    unk_chosen = int((torch.from_numpy(chosen) & is_unk).sum())
    assert unk_chosen > 0.1 * chosen.sum()
    plain = collate(info, with_epoch(real_samples, 2), seed=8)
    plain_share = (plain["labels"] != -100).sum().item() / text_tokens
    share = (labels != -100).sum().item() / text_tokens
    unk_share = is_unk.sum().item() / text_tokens
    assert share == pytest.approx(plain_share * (1 - unk_share), abs=0.01), (share, plain_share, unk_share)


def test_bag_of_words_target(info, real_samples):
    samples = real_samples[:32]
    b = collate(info, samples, seed=0)
    for r, (_, toks) in enumerate(samples):
        got = b["bow_ids"][r][b["bow_mask"][r]].tolist()
        assert got == sorted(set(toks.tolist()))
        assert b["bow_counts"][r] == len(toks)
    assert b["bow_ids"].shape[1] == max(len(set(t.tolist())) for _, t in samples)
    assert (b["bow_ids"][~b["bow_mask"]] == 0).all()


def test_too_long_sample_and_bad_settings_are_rejected(info):
    with pytest.raises(ValueError, match="longer than max_len 16"):
        collate(info, [(0, np.arange(1000, 1015, dtype=np.uint16))], max_len=16)
    with pytest.raises(ValueError, match="encoder_mask_prob"):
        DupMAECollator(info, encoder_mask_prob=0.0)


def test_works_inside_dataloader_workers(info, real_samples):
    samples = real_samples[:64]
    collator = DupMAECollator(info, seed=4, max_len=512)
    loader = torch.utils.data.DataLoader(samples, batch_size=16, num_workers=2, collate_fn=collator,
                                         multiprocessing_context="spawn")
    for i, batch in enumerate(loader):
        ref = collator(samples[16 * i : 16 * (i + 1)])
        for key in ref:
            assert torch.equal(batch[key], ref[key]), key


# ---- the decoder's per-row visibility rule -------------------------------------------------------------

def test_decoder_mask_rule(info, real_samples):
    b = collate(info, real_samples[:64], seed=9)
    mask = decoder_attention_mask(b, p_dec=0.5)
    B, L = b["input_ids"].shape
    assert mask.shape == (B, L, L) and mask.dtype == torch.bool
    shares = []
    for r in range(B):
        n = int(b["lengths"][r])
        m = mask[r]
        rows = torch.arange(n)
        assert not m[rows, rows].any(), "a row sees itself"
        assert not m[:, n:].any(), "padding visible"
        others = rows[rows != 0]
        assert m[others, 0].all(), "[CLS] hidden"
        not_last = rows[rows != n - 1]
        assert m[not_last, n - 1].all(), "final [SEP] hidden"
        words = b["word_ids"][r, 1 : n - 1]
        for i in range(n):
            vis = m[i, 1 : n - 1]
            for w in torch.unique(words):
                cols = (words == w).nonzero().flatten() + 1
                cols = cols[cols != i]
                if len(cols) > 1:
                    assert vis[cols - 1].all() or not vis[cols - 1].any(), "a word was split"
                if len(cols) and i not in ((words == w).nonzero().flatten() + 1).tolist():
                    shares.append(bool(vis[cols[0] - 1]))
    share = np.mean(shares)
    assert abs(share - 0.5) < 0.02, share


@pytest.mark.parametrize("p_dec", [0.2, 0.8])
def test_decoder_mask_visible_share_follows_p_dec(info, real_samples, p_dec):
    b = collate(info, real_samples[:100], seed=1)
    m = decoder_attention_mask(b, p_dec=p_dec)
    n = b["lengths"]
    L = m.shape[-1]
    col = torch.arange(L)
    ordinary_key = (col[None, :] > 0) & (col[None, :] < (n - 1)[:, None])
    ordinary_row = ordinary_key.clone()
    sel = ordinary_row[:, :, None] & ordinary_key[:, None, :] & ~torch.eye(L, dtype=torch.bool)[None]
    share = m[sel].float().mean().item()
    assert abs(share - (1 - p_dec)) < 0.03


def test_decoder_mask_is_deterministic_and_chunkable(info, real_samples):
    b = collate(info, real_samples[:8], seed=2)
    full = decoder_attention_mask(b)
    assert torch.equal(full, decoder_attention_mask(b))
    L = full.shape[-1]
    chunks = [decoder_visibility(b["decoder_seeds"], b["word_ids"], b["lengths"], 0.5, rows=slice(s, s + 5))
              for s in range(0, L, 5)]
    assert torch.equal(torch.cat(chunks, dim=1), full)
    other = dict(b, decoder_seeds=b["decoder_seeds"] + 1)
    assert not torch.equal(decoder_attention_mask(other), full)
