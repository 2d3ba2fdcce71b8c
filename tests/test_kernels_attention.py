"""Triton `decoder_attention` equals `kernels/reference.py`, and its in-kernel mask is `philox.decoder_visibility`
bit for bit, in forward and in backward."""
import math

import pytest
import torch

from dupmae.kernels import philox, reference
from kernel_cases import DEVICE, FLOATS, TOL, assert_close, needs_kernels, run_with_grads, word_ids

pytestmark = [pytest.mark.kernels, needs_kernels]

SEEDS = [0, 1, 2**32 + 5, 2**62 + 12345]  # the two 32-bit halves of the Philox key both matter


def attention_inputs(dtype, B=3, H=2, L=77, d=24, lengths=(77, 40, 1), seed=0):
    """q as the model makes it (a (B, L, H, d) tensor seen as (B, H, L, d)); a sample of length 1 ([CLS]
    only), whose row 0 sees nothing; padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths[:B], dtype=torch.int64)
    q = torch.randn(B, L, H, d, generator=g, dtype=torch.float64).to(DEVICE, dtype).transpose(1, 2)
    k, v = (torch.randn(B, H, L, d, generator=g, dtype=torch.float64).to(DEVICE, dtype) for _ in range(2))
    dout = torch.randn(B, H, L, d, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    seeds = torch.tensor([SEEDS[i % len(SEEDS)] for i in range(B)], dtype=torch.int64)
    wid = word_ids(lengths, L, g)
    return [t.requires_grad_() for t in (q, k, v)], seeds.to(DEVICE), wid.to(DEVICE), lengths.to(DEVICE), dout


def kernel_mask(seeds, wid, lengths, p_dec, sep_visible):
    """The visibility the kernels apply, read out of them: with q = 0 every visible key gets the same weight,
    so with v = identity, out[i, j] > 0 exactly where row i sees key j (forward kernel); and with
    dout = identity, dv[j, i] = P[i, j] > 0 exactly there too (backward dK/dV kernel)."""
    from dupmae.kernels import attention_triton

    B, L = wid.shape
    q = torch.zeros(B, 1, L, L, dtype=torch.float64, device=DEVICE)
    k = torch.randn(B, 1, L, L, dtype=torch.float64, device=DEVICE)
    eye = torch.eye(L, dtype=torch.float64, device=DEVICE).expand(B, 1, L, L)
    v = eye.clone().requires_grad_()
    out = attention_triton.decoder_attention(q, k, v, seeds, wid, lengths, p_dec, 0.0, sep_visible)
    (dv,) = torch.autograd.grad(out, v, eye)
    return out[:, 0] > 0, dv[:, 0].transpose(1, 2) > 0


@pytest.mark.skipif(DEVICE == "cuda", reason="float64 read-out runs in the interpreter")
@pytest.mark.parametrize("p_dec, sep_visible", [(0.5, True), (0.3, False)])
def test_in_kernel_mask_is_decoder_visibility_bit_for_bit(p_dec, sep_visible):
    g = torch.Generator().manual_seed(1)
    L = 77
    lengths = torch.tensor([77, 51, 2, 30])
    seeds = torch.tensor(SEEDS, dtype=torch.int64)
    wid = word_ids(lengths, L, g)
    forward, backward = kernel_mask(seeds, wid, lengths, p_dec, sep_visible)
    expected = philox.decoder_visibility(seeds, wid, lengths, p_dec, sep_always_visible=sep_visible)
    assert torch.equal(forward, expected)
    assert torch.equal(backward, expected)
    hidden = ~expected[0, 1:76, 1:76] & ~torch.eye(75, dtype=torch.bool)
    assert 0.2 < float(hidden.float().mean()) < 0.6  # words, not tokens, are hidden, about p_dec of them


@pytest.mark.parametrize("sep_visible", [True, False])
@pytest.mark.parametrize("dtype", FLOATS)
def test_matches_reference_forward_and_gradients(dtype, sep_visible):
    from dupmae.kernels import attention_triton

    (q, k, v), seeds, wid, lengths, dout = attention_inputs(dtype)
    inputs = [q, k, v, seeds, wid, lengths, 0.5, 0.0, sep_visible]
    out, grads = run_with_grads(attention_triton.decoder_attention, inputs, dout)
    ref, grads_ref = run_with_grads(reference.decoder_attention, inputs, dout)
    assert_close(out, ref, TOL[dtype], "out")
    for name, ours, theirs in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(ours, theirs, TOL[dtype], name)
    assert bool((out[2, :, 0] == 0).all())  # [CLS]-only sample: row 0 sees nothing, outputs zeros
    assert bool((grads[0][2, :, 0] == 0).all())


def test_small_blocks_and_rows_that_see_nothing(monkeypatch):
    """Many query and key blocks (the online softmax across blocks, masked tails), and p_dec near 1 without the
    [SEP] rule, so row 0 of every sample sees no key."""
    from dupmae.kernels import attention_triton

    small = dict(BLOCK_M=16, BLOCK_N=16)
    for name in ("FWD", "DKDV", "DQ", "DELTA"):
        monkeypatch.setattr(attention_triton, "INTERPRET_" + name, small)
        monkeypatch.setattr(attention_triton, "GPU_" + name, {"16bit": small, "fp32": small})
    dtype = torch.float64 if DEVICE == "cpu" else torch.float32
    (q, k, v), seeds, wid, lengths, dout = attention_inputs(dtype, B=2, L=50, d=20, lengths=(50, 33))
    inputs = [q, k, v, seeds, wid, lengths, 0.999, 0.0, False]
    out, grads = run_with_grads(attention_triton.decoder_attention, inputs, dout)
    ref, grads_ref = run_with_grads(reference.decoder_attention, inputs, dout)
    assert bool((out[:, :, 0] == 0).all())
    assert_close(out, ref, TOL[dtype], "out")
    for name, ours, theirs in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(ours, theirs, TOL[dtype], name)


@pytest.mark.parametrize("dtype", FLOATS)
def test_dropout_is_bert_dropout_with_the_philox_port_draws(dtype):
    """softmax, then each probability kept with probability 1 - p and scaled by 1 / (1 - p), the draws being
    `philox.attention_dropout_keep` from a seed that torch.manual_seed fixes."""
    from dupmae.kernels import attention_triton

    (q, k, v), seeds, wid, lengths, dout = attention_inputs(dtype, B=2, L=45, lengths=(45, 20))
    B, H, L, d = q.shape
    p = 0.25
    torch.manual_seed(7)
    out, grads = run_with_grads(attention_triton.decoder_attention, [q, k, v, seeds, wid, lengths, 0.5, p], dout)
    torch.manual_seed(7)
    dropout_seed = int(torch.randint(0, 1 << 62, (1,)).item())
    keep = philox.attention_dropout_keep(dropout_seed, B, H, L, p, device=DEVICE)
    assert 0.7 < float(keep.float().mean()) < 0.8

    def explicit(q, k, v):
        visible = philox.decoder_visibility(seeds, wid, lengths, 0.5)[:, None]
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        return (probs * keep / (1 - p)) @ v

    ref, grads_ref = run_with_grads(explicit, [q, k, v], dout)
    assert_close(out, ref, TOL[dtype], "out")
    for name, ours, theirs in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(ours, theirs, TOL[dtype], name)
    torch.manual_seed(8)
    assert not torch.equal(attention_triton.decoder_attention(q, k, v, seeds, wid, lengths, 0.5, p), out)


@pytest.mark.skipif(DEVICE == "cuda", reason="float64 gradcheck runs in the interpreter")
def test_gradcheck_float64():
    from dupmae.kernels import attention_triton

    (q, k, v), seeds, wid, lengths, _ = attention_inputs(torch.float64, B=2, H=1, L=9, d=4, lengths=(9, 6))
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention_triton.decoder_attention(q, k, v, seeds, wid, lengths, 0.5), (q, k, v),
        fast_mode=True)


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter check: bf16 is upcast to float32 on CPU")
def test_bf16_inputs_are_computed_in_float32_by_the_interpreter():
    from dupmae.kernels import attention_triton

    (q, k, v), seeds, wid, lengths, dout = attention_inputs(torch.float32, B=2, lengths=(77, 30))
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    out = attention_triton.decoder_attention(*low, seeds, wid, lengths, 0.5)
    ref = reference.decoder_attention(*(t.detach().float() for t in low), seeds, wid, lengths, 0.5)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), ref, 1e-2, "out")
    out.backward(dout.bfloat16())
    assert all(t.grad.dtype == torch.bfloat16 and bool(t.grad.abs().sum() > 0) for t in low)


def test_empty_batch_and_single_position():
    from dupmae.kernels import attention_triton

    for B, L in ((0, 5), (2, 1)):
        q, k, v = (torch.randn(B, 2, L, 16, device=DEVICE, requires_grad=True) for _ in range(3))
        lengths = torch.full((B,), L, dtype=torch.int64, device=DEVICE)
        wid = torch.zeros(B, L, dtype=torch.int32, device=DEVICE)
        seeds = torch.zeros(B, dtype=torch.int64, device=DEVICE)
        out = attention_triton.decoder_attention(q, k, v, seeds, wid, lengths)
        ref = reference.decoder_attention(q, k, v, seeds, wid, lengths)
        assert torch.equal(out, ref) and not bool(out.abs().sum())  # a single position sees nothing: zeros
        out.sum().backward()
        assert not bool(q.grad.abs().sum())
