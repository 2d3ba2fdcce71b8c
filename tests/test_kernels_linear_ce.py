"""Triton `linear_cross_entropy` (Liger-Kernel inside our autograd Function) equals `kernels/reference.py`,
including where Liger's own Function does not: a second backward, weight-only gradients, zero rows."""
import pytest
import torch

from dupmae.kernels import reference
from kernel_cases import DEVICE, FLOATS, TOL, assert_close, needs_kernels, needs_liger

pytestmark = [pytest.mark.kernels, needs_kernels, needs_liger]

# Liger computes the softmax in float32 whatever the input: float64 results are float32-accurate
LIGER_TOL = {torch.float32: TOL[torch.float32], torch.float64: 2e-6}


def ce_inputs(dtype, N=50, V=1000, D=48, bias=True, ignored=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    weight = (torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5).to(DEVICE, dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(DEVICE, dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::ignored] = -100
    return [t.requires_grad_() if t is not None else None for t in (hidden, weight, b)], labels.to(DEVICE)


def loss_and_grads(fn, hidden, weight, bias, labels, reduction, scale=0.37):
    loss = fn(hidden, weight, bias, labels, reduction=reduction)
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    return loss, torch.autograd.grad(loss * scale, leaves)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_matches_reference_with_bias_and_ignored_rows(dtype, reduction):
    from dupmae.kernels import linear_ce

    (hidden, weight, bias), labels = ce_inputs(dtype)
    loss, grads = loss_and_grads(linear_ce.linear_cross_entropy, hidden, weight, bias, labels, reduction)
    ref, grads_ref = loss_and_grads(reference.linear_cross_entropy, hidden, weight, bias, labels, reduction)
    assert_close(loss, ref, LIGER_TOL[dtype], "loss")
    for name, ours, theirs in zip(("dhidden", "dW", "db"), grads, grads_ref):
        assert_close(ours, theirs, LIGER_TOL[dtype], name)
    assert not bool(grads[0][::7].abs().sum())  # ignored rows get no gradient


def test_without_bias_and_weight_only_gradients():
    """Liger's own Function returns no gradient at all when hidden needs none; ours returns dW."""
    from dupmae.kernels import linear_ce

    (hidden, weight, _), labels = ce_inputs(torch.float32, bias=False)
    hidden = hidden.detach()
    loss, (dw,) = loss_and_grads(linear_ce.linear_cross_entropy, hidden, weight, None, labels, "sum")
    ref, (dw_ref,) = loss_and_grads(reference.linear_cross_entropy, hidden, weight, None, labels, "sum")
    assert_close(loss, ref, TOL[torch.float32], "loss")
    assert_close(dw, dw_ref, TOL[torch.float32], "dW")


def test_second_backward_through_the_same_graph_gives_the_same_gradients():
    """Liger's own Function scales its saved gradients in place, so a second backward would be scaled twice."""
    from dupmae.kernels import linear_ce

    (hidden, weight, bias), labels = ce_inputs(torch.float32, N=20)
    loss = linear_ce.linear_cross_entropy(hidden, weight, bias, labels, reduction="sum")
    first = torch.autograd.grad(loss * 0.5, (hidden, weight, bias), retain_graph=True)
    second = torch.autograd.grad(loss * 0.5, (hidden, weight, bias))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_zero_rows_and_all_ignored_rows_give_zero(reduction):
    from dupmae.kernels import linear_ce

    (hidden, weight, bias), labels = ce_inputs(torch.float32, N=6)
    for rows, ys in ((slice(0, 0), labels[:0]), (slice(None), torch.full_like(labels, -100))):
        h = hidden.detach()[rows].requires_grad_()
        loss = linear_ce.linear_cross_entropy(h, weight, bias, ys, reduction=reduction)
        ref = reference.linear_cross_entropy(h, weight, bias, ys, reduction=reduction)
        assert loss.item() == ref.item() == 0.0 and loss.dtype == ref.dtype
        dh, dw, db = torch.autograd.grad(loss, (h, weight, bias), allow_unused=True)
        assert all(g is None or not bool(g.abs().sum()) for g in (dh, dw, db))


def test_under_no_grad_it_computes_the_loss_only(monkeypatch):
    """(autograd.Function's needs_input_grad stays True under torch.no_grad: the gradients, computed in the
    forward pass, would be wasted work in evaluation)"""
    from liger_kernel.ops import fused_linear_cross_entropy as liger

    from dupmae.kernels import linear_ce

    asked = []
    forward = liger.fused_linear_cross_entropy_forward
    monkeypatch.setattr(liger, "fused_linear_cross_entropy_forward",
                        lambda **kw: asked.append(kw["compute_gradients"]) or forward(**kw))
    (hidden, weight, bias), labels = ce_inputs(torch.float32, N=10)
    with torch.no_grad():
        loss = linear_ce.linear_cross_entropy(hidden, weight, bias, labels)
        ref = reference.linear_cross_entropy(hidden, weight, bias, labels)
    assert asked == [False] and not loss.requires_grad
    assert_close(loss, ref, TOL[torch.float32], "loss")
