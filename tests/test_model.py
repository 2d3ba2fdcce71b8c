"""DupMAE computes exactly what the naive, full-logits implementation of DESIGN.md computes."""
import copy
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dupmae.data_pipeline.collator import DupMAECollator
from dupmae.data_pipeline.tokenizer import load_fast_tokenizer, resolve_tokenizer_path, tokenizer_info
from dupmae.engine.model import DupMAE, ModelConfig

from naive_dupmae import naive_losses

CORPUS = Path(__file__).resolve().parents[1] / "data" / "wordnet" / "corpus.jsonl"
SWITCHES = list(itertools.product(["layernorm", "plain"], ["all", "unmasked"], ["count", "sum"], [True, False]))


def tiny_config(vocab_size: int, **kw) -> dict:
    cfg = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def info():
    return tokenizer_info()


@pytest.fixture(scope="module")
def real_batch(info):
    tok = load_fast_tokenizer(str(resolve_tokenizer_path(None)))
    with open(CORPUS, encoding="utf-8") as f:
        docs = [json.loads(line) for _, line in zip(range(6), f)]
    ids = tok([f"{d['title']} {d['text']}" for d in docs], add_special_tokens=False)["input_ids"]
    return DupMAECollator(info, seed=3, max_len=128)([(i, np.asarray(x, np.uint16)) for i, x in enumerate(ids)])


def random_batch(info, vocab: int, seed: int, B=5, max_text=30):
    """Random token ids below `vocab` with '##' pieces taken from the real vocabulary's table."""
    g = np.random.default_rng(seed)
    samples = [(int(g.integers(0, 10**6)), g.integers(5, vocab, size=int(g.integers(3, max_text))).astype(np.uint16))
               for _ in range(B)]
    small = copy.copy(info)
    object.__setattr__(small, "vocab_size", vocab)
    return DupMAECollator(small, seed=seed, max_len=64)(samples)


def build(vocab, switches=("layernorm", "all", "count", True), seed=0, **kw):
    torch.manual_seed(seed)
    qs, bp, bn, sep = switches
    cfg = ModelConfig(encoder_config=tiny_config(vocab, **kw), query_stream=qs, bow_positions=bp,
                      bow_normalization=bn, sep_always_visible=sep, kernels="reference")
    model = DupMAE.from_config(cfg).double()
    model.train()
    return model


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(ours: DupMAE, batch, rel=1e-5):
    out = ours(batch)
    g_ours = grads_of(ours, out.loss)
    naive = naive_losses(ours, batch)
    g_naive = grads_of(ours, naive["total"])
    for part, value in out.parts().items():
        assert value == pytest.approx(naive[part].item(), rel=rel), part
    assert g_ours.keys() == g_naive.keys()
    scale = max(float(g.norm()) for g in g_naive.values())
    for name in g_naive:
        ref = float(g_naive[name].norm())
        diff = float((g_ours[name] - g_naive[name]).norm())
        if ref < 1e-6 * scale:
            # analytically zero (attention key biases: softmax ignores a shift shared by a whole row)
            assert float(g_ours[name].norm()) < 1e-5 * scale, f"{name}: should be ~0"
            continue
        assert diff / ref < rel, f"{name}: relative gradient error {diff / ref:.2e}"


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(map(str, s)))
def test_matches_naive_on_random_tiny_model(info, switches):
    model = build(997, switches)
    # float32 exactness is asserted below; float64 here isolates the semantics from rounding
    assert_same(model, random_batch(info, 997, seed=1), rel=1e-9)


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(map(str, s)))
def test_matches_naive_in_float32_on_real_text(info, real_batch, switches):
    model = build(info.vocab_size, switches).float()
    assert_same(model, real_batch, rel=1e-5)


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(map(str, s)))
def test_matches_naive_in_float32_on_random_tiny_model(info, switches):
    model = build(997, switches, seed=1).float()
    assert_same(model, random_batch(info, 997, seed=2), rel=1e-5)


def test_small_chunks_change_nothing(info, monkeypatch, real_batch):
    """Chunk boundaries inside the vocabulary, the tokens and the rows are invisible in the result."""
    from dupmae.kernels import reference

    torch.manual_seed(0)
    model = DupMAE.from_config(ModelConfig(encoder_config=tiny_config(info.vocab_size), kernels="reference")).double()
    out = model(real_batch)
    big = grads_of(model, out.loss)
    monkeypatch.setattr(reference, "VOCAB_CHUNK", 1000)
    monkeypatch.setattr(reference, "TOKEN_CHUNK", 7)
    monkeypatch.setattr(reference, "ROW_CHUNK", 5)
    calls = []
    original = reference._attention_rows
    monkeypatch.setattr(reference, "_attention_rows", lambda *a: calls.append(a[-3:-1]) or original(*a))
    out2 = model(real_batch)
    small = grads_of(model, out2.loss)
    L = real_batch["input_ids"].shape[1]
    assert calls[: -(-L // 5)] == [(r, min(r + 5, L)) for r in range(0, L, 5)]
    assert out2.loss.item() == pytest.approx(out.loss.item(), rel=1e-12)
    for n in big:
        torch.testing.assert_close(small[n], big[n], rtol=1e-10, atol=1e-12)


def test_same_seed_and_batch_give_the_same_loss_bit_for_bit(info, real_batch):
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        cfg = ModelConfig(encoder_config=tiny_config(info.vocab_size, hidden_dropout_prob=0.1,
                                                     attention_probs_dropout_prob=0.1), kernels="reference")
        model = DupMAE.from_config(cfg)
        model.train()
        torch.manual_seed(123)
        out = model(real_batch)
        out.loss.backward()
        losses.append((out.loss.item(), out.mlm_loss.item(), out.dec_loss.item(), out.bow_loss.item(),
                       model.enhanced_decoder.attention.self.query.weight.grad.sum().item()))
    assert losses[0] == losses[1]


def test_head_is_tied_and_untouched_by_the_decoder(info):
    model = build(997)
    lm = model.lm
    assert lm.cls.predictions.decoder.weight is lm.bert.embeddings.word_embeddings.weight
    names = [n for n, _ in model.named_parameters()]
    assert not any("cls.predictions.decoder.weight" in n for n in names)
    assert any(n.startswith("enhanced_decoder.attention.self.query") for n in names)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model.query_stream"):
        ModelConfig(encoder_config={}, query_stream="paper").validate()
    with pytest.raises(ValueError, match="model.p_dec"):
        ModelConfig(encoder_config={}, p_dec=1.0).validate()
    with pytest.raises(ValueError, match="model.encoder"):
        ModelConfig().validate()


# -- the pre-training objective switch: dupmae | retromae | mlm ------------------------------------------


def _twin(model: DupMAE, objective: str, query_stream: str = "layernorm") -> DupMAE:
    """A model of `objective` sharing `model`'s encoder, head and (where it has one) decoder weights."""
    cfg = dataclasses.replace(model.cfg, objective=objective, query_stream=query_stream)
    twin = DupMAE(model.lm, cfg)
    if twin.enhanced_decoder is not None:
        twin.enhanced_decoder = model.enhanced_decoder
    return twin.train()


def test_mlm_objective_is_the_encoders_mlm_loss_alone(info, real_batch):
    full = build(info.vocab_size)
    mlm = _twin(full, "mlm")
    assert mlm.enhanced_decoder is None
    assert not any(n.startswith("enhanced_decoder") for n, _ in mlm.named_parameters())
    ours, ref = mlm(real_batch), full(real_batch)
    assert ours.loss.item() == pytest.approx(ref.mlm_loss.item(), rel=1e-12)
    assert ours.dec_loss.item() == 0.0 and ours.bow_loss.item() == 0.0 and ours.dec_tokens == 0
    naive = naive_losses(full, real_batch)["mlm"]
    g_ours, g_naive = grads_of(mlm, ours.loss), grads_of(full, naive)
    assert g_ours.keys() <= g_naive.keys()
    for name, g in g_ours.items():
        torch.testing.assert_close(g, g_naive[name], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("query_stream", ["layernorm", "plain"])
def test_retromae_objective_is_mlm_plus_decoder_without_bow(info, real_batch, query_stream):
    full = build(info.vocab_size, switches=(query_stream, "all", "count", True))
    retro = _twin(full, "retromae", query_stream)
    ours, ref = retro(real_batch), full(real_batch)
    assert ours.bow_loss.item() == 0.0
    assert ours.mlm_loss.item() == pytest.approx(ref.mlm_loss.item(), rel=1e-12)
    assert ours.dec_loss.item() == pytest.approx(ref.dec_loss.item(), rel=1e-12)
    assert ours.loss.item() == pytest.approx(ref.mlm_loss.item() + ref.dec_loss.item(), rel=1e-12)
    naive = naive_losses(full, real_batch)
    g_ours, g_naive = grads_of(retro, ours.loss), grads_of(full, naive["mlm"] + naive["dec"])
    for name, g in g_ours.items():
        torch.testing.assert_close(g, g_naive[name], rtol=1e-7, atol=1e-10)


def test_objective_flops_and_config_errors(info):
    from dupmae.engine.metrics import step_flops

    config = build(info.vocab_size).config
    f = {o: step_flops(config, (8, 128), 300, 500, o) for o in ("dupmae", "retromae", "mlm")}
    assert f["mlm"] < f["retromae"] < f["dupmae"]
    with pytest.raises(ValueError, match="model.objective"):
        ModelConfig(encoder_config=tiny_config(100), objective="bert").validate()
