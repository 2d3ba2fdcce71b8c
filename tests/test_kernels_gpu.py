"""On a CUDA GPU: the kernels in bf16 against the float32 reference at BERT-base shapes, bit-for-bit
determinism, and automatic dispatch in the model. Skipped without CUDA (the interpreter tests cover the
semantics; these cover what only a GPU shows: bf16 tensor-core accuracy, scheduling, atomics-free sums)."""
import pytest
import torch

from dupmae import kernels
from dupmae.kernels import reference

pytestmark = [pytest.mark.gpu, pytest.mark.kernels,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

B, L, D, H, V = 4, 512, 768, 12, 30522


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def grads_of(fn, inputs, dout):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    out = fn(*inputs)
    first = out[0] if isinstance(out, tuple) else out
    return out, torch.autograd.grad(first, leaves, dout)


def bow_case(dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(B, L, D, device="cuda", generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, device="cuda", generator=g) / D**0.5).to(dtype).requires_grad_()
    bias = torch.randn(V, device="cuda", generator=g).to(dtype).requires_grad_()
    valid = torch.rand(B, L, device="cuda", generator=g) > 0.1
    valid[:, 0] = False
    valid[1, 300:] = False
    dmu = torch.randn(B, V, device="cuda", generator=g).to(dtype)
    return [hidden, weight, bias, valid], dmu


def attention_case(dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, L, H, D // H, device="cuda", generator=g).to(dtype).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(B, H, L, D // H, device="cuda", generator=g).to(dtype).requires_grad_() for _ in range(2))
    lengths = torch.tensor([512, 300, 77, 3], device="cuda")
    wid = torch.cumsum(torch.rand(B, L, device="cuda", generator=g) > 0.3, 1).to(torch.int32)
    seeds = torch.tensor([1, 2**40 + 3, 7, 2**62], device="cuda")
    dout = torch.randn(B, H, L, D // H, device="cuda", generator=g).to(dtype)
    return [q, k, v, seeds, wid, lengths, 0.5], dout


def ce_case(dtype, N=2048, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(N, D, device="cuda", generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, device="cuda", generator=g) / D**0.5).to(dtype).requires_grad_()
    bias = torch.randn(V, device="cuda", generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    labels[::9] = -100
    return [hidden, weight, bias, labels]


def as_fp32(inputs):
    return [t.detach().float().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in inputs]


def test_bow_max_pool_bf16_tracks_the_fp32_reference():
    from dupmae.kernels import bow_triton

    inputs, dmu = bow_case(torch.bfloat16)
    (mu, arg), grads = grads_of(bow_triton.bow_max_pool, inputs, dmu)
    (mu_ref, arg_ref), grads_ref = grads_of(reference.bow_max_pool, as_fp32(inputs), dmu.float())
    assert rel_err(mu, mu_ref) < 1e-2
    assert float((arg == arg_ref).float().mean()) > 0.99  # the same bf16 values, fp32 sums in another order
    for name, a, b in zip(("dhidden", "dW", "db"), grads, grads_ref):
        assert rel_err(a, b) < 5e-2, name


def test_decoder_attention_bf16_tracks_the_fp32_reference():
    from dupmae.kernels import attention_triton

    inputs, dout = attention_case(torch.bfloat16)
    out, grads = grads_of(attention_triton.decoder_attention, inputs, dout)
    ref, grads_ref = grads_of(reference.decoder_attention, as_fp32(inputs), dout.float())
    assert rel_err(out, ref) < 2e-2
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert rel_err(a, b) < 3e-2, name


def test_decoder_attention_fp32_equals_the_reference():
    from dupmae.kernels import attention_triton

    inputs, dout = attention_case(torch.float32)
    out, grads = grads_of(attention_triton.decoder_attention, inputs, dout)
    ref, grads_ref = grads_of(reference.decoder_attention, inputs, dout)
    assert rel_err(out, ref) < 1e-5
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert rel_err(a, b) < 1e-5, name


def test_linear_cross_entropy_bf16_tracks_the_fp32_reference():
    from dupmae.kernels import linear_ce

    inputs = ce_case(torch.bfloat16)
    loss, grads = grads_of(lambda *a: linear_ce.linear_cross_entropy(*a, reduction="sum"), inputs, None)
    ref, grads_ref = grads_of(lambda *a: reference.linear_cross_entropy(*a, reduction="sum"), as_fp32(inputs), None)
    assert float(loss) == pytest.approx(float(ref), rel=1e-2)
    for name, a, b in zip(("dhidden", "dW", "db"), grads, grads_ref):
        assert rel_err(a, b) < 5e-2, name


@pytest.mark.parametrize("op", ["bow_max_pool", "decoder_attention", "decoder_attention_dropout", "linear_ce"])
def test_bit_for_bit_deterministic(op):
    from dupmae.kernels import attention_triton, bow_triton, linear_ce

    def run():
        torch.manual_seed(3)
        if op == "bow_max_pool":
            inputs, dout = bow_case(torch.bfloat16)
            return grads_of(bow_triton.bow_max_pool, inputs, dout)
        if op.startswith("decoder_attention"):
            inputs, dout = attention_case(torch.bfloat16)
            inputs.append(0.1 if op.endswith("dropout") else 0.0)
            return grads_of(attention_triton.decoder_attention, inputs, dout)
        return grads_of(lambda *a: linear_ce.linear_cross_entropy(*a, reduction="sum"), ce_case(torch.bfloat16), None)

    (out1, g1), (out2, g2) = run(), run()
    out1, out2 = (out1 if isinstance(out1, tuple) else (out1,)), (out2 if isinstance(out2, tuple) else (out2,))
    assert all(torch.equal(a, b) for a, b in zip(out1, out2))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_the_model_dispatches_to_triton_on_cuda_and_matches_the_reference():
    from test_kernels_dispatch import tiny_model_and_batch

    x = torch.zeros(1, device="cuda")
    for op in ("bow_max_pool", "decoder_attention", "linear_cross_entropy"):
        assert kernels.resolve_impl(op, x) == "triton"
        assert kernels.resolve_impl(op, x.double()) == "reference"
    model, batch = tiny_model_and_batch("reference", vocab=30522)
    ref = model(batch)
    ref_grads = torch.autograd.grad(ref.loss, list(model.parameters()), allow_unused=True)
    model.cfg.kernels = "auto"
    out = model(batch)
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    for part, value in ref.parts().items():
        assert out.parts()[part] == pytest.approx(value, rel=1e-4), part
    scale = max(float(g.norm()) for g in ref_grads if g is not None)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        if b is not None:
            assert float((a - b).norm()) <= 1e-4 * max(float(b.norm()), 1e-3 * scale), name
