"""`linear_cross_entropy` on GPU: Liger-Kernel's fused linear cross-entropy inside our own autograd Function.

Liger (linkedin/Liger-Kernel, pinned in constraints.txt) computes CE(hidden @ W.T + b) a chunk of rows at a time,
with cuBLAS matmuls and one Triton kernel that turns each chunk's logits into its loss and, in place, its
gradient; dhidden, dW and db are accumulated in the same pass, so no N x V logits exist. It fits DupMAE: bias,
ignore_index -100 and reduction "sum" (the model divides by its global token counts) or "mean".

We call its forward function, not its `autograd.Function`, for four reasons, each covered by a test:
- its Function rescales the saved gradients IN PLACE by the incoming gradient, so a second backward through
  the same graph (retain_graph) is scaled twice; ours multiplies out of place;
- its Function computes no gradient at all (not even dW) when `hidden` does not require one;
- it divides by zero on zero rows (an MLM batch with no masked position); we return the reference's 0;
- its loss is float32 whatever the input; ours is returned in the reference's dtype. Liger's softmax runs in
  float32 even for float64 inputs, so float64 results are only float32-accurate.
"""
from __future__ import annotations

import torch

from . import reference
from ._triton_util import acc_dtype, interpreting, upcast_for_interpreter


class _LigerLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, reduction, grad_enabled):
        from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

        want = grad_enabled and any(ctx.needs_input_grad[:3])  # needs_input_grad ignores torch.no_grad
        loss, _, _, _, dhidden, dweight, dbias = fused_linear_cross_entropy_forward(
            _input=hidden, weight=weight, target=labels, bias=bias, ignore_index=-100, reduction=reduction,
            accum_dtype=acc_dtype(hidden.dtype), compute_gradients=want,
            weight_requires_grad=ctx.needs_input_grad[1])
        ctx.has = (dhidden is not None and want, dweight is not None, dbias is not None)
        ctx.save_for_backward(*(t for t, ok in zip((dhidden, dweight, dbias), ctx.has) if ok))
        return loss.to(acc_dtype(hidden.dtype))

    @staticmethod
    def backward(ctx, dloss):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if ok else None for ok in ctx.has]
        grads = [None if g is None or not need else g * dloss.to(g.dtype)
                 for g, need in zip(grads, ctx.needs_input_grad[:3])]
        return (*grads, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, token_chunk: int | None = None, reduction: str = "mean") -> torch.Tensor:
    """`reference.linear_cross_entropy` through Liger-Kernel (same arguments, results and gradients).
    `token_chunk` is the reference's chunk size; Liger sizes its own chunks (about N x D logits at a time)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"linear_cross_entropy: hidden, weight and bias must share a dtype, got {hidden.dtype}, "
                        f"{weight.dtype}, {None if bias is None else bias.dtype}")
    if hidden.shape[0] == 0:
        return reference.linear_cross_entropy(hidden, weight, bias, labels, reduction=reduction)
    labels = labels.to(torch.int64).contiguous()
    if interpreting(hidden):  # the loss is float32 for 16-bit inputs anyway: nothing to cast back
        (hidden, weight, bias), _ = upcast_for_interpreter(hidden, weight, bias)
    return _LigerLinearCrossEntropy.apply(hidden, weight, bias, labels, reduction, torch.is_grad_enabled())
