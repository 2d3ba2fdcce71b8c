"""Triton `bow_max_pool` equals `kernels/reference.py`: mu, argmax, and the gradients of hidden, W and b."""
import pytest
import torch

from dupmae.kernels import reference
from kernel_cases import DEVICE, FLOATS, TOL, assert_close, needs_kernels, run_with_grads

pytestmark = [pytest.mark.kernels, needs_kernels]


def bow_inputs(dtype, B=3, L=77, V=1000, D=48, bias=True, seed=0):
    """Odd shapes; hidden and W as strided views; one row with no valid position, one with a single one,
    padding tails of several lengths."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, D + 5, generator=g, dtype=torch.float64).to(DEVICE, dtype)[..., :D]
    weight = torch.randn(D, V, generator=g, dtype=torch.float64).to(DEVICE, dtype).t()
    b = torch.randn(V, generator=g, dtype=torch.float64).to(DEVICE, dtype) if bias else None
    valid = torch.rand(B, L, generator=g) > 0.2
    valid[:, 0] = False  # [CLS]
    valid[0, 50:] = False
    if B > 1:
        valid[1] = False  # no valid position: mu = lowest, argmax 0, gradient to position 0
    if B > 2:
        valid[2] = False
        valid[2, L // 2] = True
    dmu = torch.randn(B, V, generator=g, dtype=torch.float64)
    leaves = [t.requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    return leaves, valid.to(DEVICE), dmu.to(DEVICE, dtype)


def compare(dtype, **kw):
    from dupmae.kernels import bow_triton

    (hidden, weight, bias), valid, dmu = bow_inputs(dtype, **kw)
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    inputs = [hidden, weight, bias, valid]
    (mu, arg), grads = run_with_grads(bow_triton.bow_max_pool, inputs, dmu)
    (mu_ref, arg_ref), grads_ref = run_with_grads(reference.bow_max_pool, inputs, dmu)
    assert_close(mu, mu_ref, TOL[dtype], "mu")
    assert torch.equal(arg, arg_ref), f"argmax differs at {int((arg != arg_ref).sum())} entries"
    for name, ours, ref in zip(("dhidden", "dW", "db"), grads, grads_ref):
        assert_close(ours, ref, TOL[dtype], name)
    return mu, arg, valid


@pytest.mark.parametrize("dtype", FLOATS)
def test_matches_reference_on_odd_shapes_with_empty_rows(dtype):
    mu, arg, valid = compare(dtype)
    assert bool((mu[1] == torch.finfo(dtype).min).all()) and bool((arg[1] == 0).all())
    assert bool((arg[2] == valid.shape[1] // 2).all())
    assert bool(valid[0].gather(0, arg[0]).all())


def test_small_blocks_loop_over_positions_words_and_features(monkeypatch):
    """Blocks far smaller than the shapes: running max across position blocks, masked word and feature tails,
    several gathered rows per dhidden program."""
    from dupmae.kernels import bow_triton

    monkeypatch.setattr(bow_triton, "INTERPRET_FWD", dict(BLOCK_L=16, BLOCK_V=128, BLOCK_D=16))
    monkeypatch.setattr(bow_triton, "INTERPRET_DWEIGHT", dict(BLOCK_V=128, BLOCK_D=16))
    monkeypatch.setattr(bow_triton, "INTERPRET_DHIDDEN", dict(BLOCK_N=4, BLOCK_D=16))
    if DEVICE == "cuda":
        for name in ("GPU_FWD", "GPU_FWD_SHORT", "GPU_DWEIGHT", "GPU_DHIDDEN"):
            blocks = dict(getattr(bow_triton, "INTERPRET_" + name[4:].removesuffix("_SHORT")))
            monkeypatch.setattr(bow_triton, name, {"16bit": blocks, "fp32": blocks})
    compare(torch.float64 if DEVICE == "cpu" else torch.float32, B=2, L=40, V=300, D=40)


def test_ties_go_to_the_first_position_within_and_across_position_blocks(monkeypatch):
    """Equal logits at several positions: the argmax is the first, as torch.max's, whether the copies share a
    block of positions or not (blocks of 16 positions here)."""
    from dupmae.kernels import bow_triton

    monkeypatch.setattr(bow_triton, "INTERPRET_FWD", dict(BLOCK_L=16, BLOCK_V=128, BLOCK_D=16))
    if DEVICE == "cuda":
        blocks = {"16bit": bow_triton.INTERPRET_FWD, "fp32": bow_triton.INTERPRET_FWD}
        monkeypatch.setattr(bow_triton, "GPU_FWD", blocks)
        monkeypatch.setattr(bow_triton, "GPU_FWD_SHORT", blocks)
    (hidden, weight, bias), valid, _ = bow_inputs(torch.float32, B=2, L=40, V=300, D=32)
    valid[:] = True
    with torch.no_grad():
        hidden[0, 20] = hidden[0, 5]  # block 0 and block 1
        hidden[0, 9] = hidden[0, 5]  # both in block 0
        hidden[1] = hidden[1, 3]  # every position alike
    mu, arg = bow_triton.bow_max_pool(hidden, weight, bias, valid)
    mu_ref, arg_ref = reference.bow_max_pool(hidden, weight, bias, valid)
    assert torch.equal(arg, arg_ref)
    assert bool((arg[1] == 0).all())
    assert not bool(((arg[0] == 9) | (arg[0] == 20)).any()) and bool((arg[0] == 5).any())


def test_without_bias():
    compare(torch.float32, bias=False)


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter check: bf16 is upcast to float32 on CPU")
def test_bf16_inputs_are_computed_in_float32_by_the_interpreter():
    from dupmae.kernels import bow_triton

    (hidden, weight, bias), valid, dmu = bow_inputs(torch.float32)
    low = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight, bias)]
    mu, arg = bow_triton.bow_max_pool(*low, valid)
    mu_ref, arg_ref = reference.bow_max_pool(*(t.detach() for t in low), valid)
    assert_close(mu, mu_ref, 1e-2, "mu")  # garbage, not rounding, is what this guards against
    assert float((arg == arg_ref).float().mean()) > 0.99
    mu.backward(dmu.bfloat16())
    assert all(t.grad.dtype == torch.bfloat16 and bool(t.grad.abs().sum() > 0) for t in low)


@pytest.mark.skipif(DEVICE == "cuda", reason="float64 gradcheck runs in the interpreter")
def test_gradcheck_float64():
    from dupmae.kernels import bow_triton

    (hidden, weight, bias), valid, _ = bow_inputs(torch.float64, B=2, L=6, V=20, D=16)
    valid[1] = True  # a row with no valid position is constant: its defined gradient (to position 0) is no derivative
    valid[1, 4:] = False
    assert torch.autograd.gradcheck(lambda h, w, b: bow_triton.bow_max_pool(h, w, b, valid)[0],
                                    (hidden, weight, bias), fast_mode=True)

