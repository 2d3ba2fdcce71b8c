"""What the kernel tests share: where the kernels run, inputs shaped like the collator's, comparisons."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# CUDA runs the compiled kernels; a CPU runs them in Triton's interpreter (conftest sets TRITON_INTERPRET=1
# where there is no GPU)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="the Triton kernels need triton and CUDA, or TRITON_INTERPRET=1")
needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
# float64 checks the semantics with rounding out of the way; it runs in the interpreter only (no GPU path)
FLOATS = [torch.float32, pytest.param(torch.float64, marks=pytest.mark.skipif(
    DEVICE == "cuda", reason="float64 Triton dots are an interpreter-only check"))]
# max |ours - reference| / max |reference|
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def word_ids(lengths: torch.Tensor, L: int, gen: torch.Generator, piece_prob: float = 0.3) -> torch.Tensor:
    """Word ids as the collator makes them: 0 on [CLS] and padding, 1.. per whole word (a "##" piece, drawn
    with `piece_prob`, joins the word before it), n_words + 1 on the final [SEP]."""
    B = len(lengths)
    starts = (torch.rand(B, L, generator=gen) >= piece_prob).long()
    col = torch.arange(L)[None, :]
    ordinary = (col > 0) & (col < (lengths - 1)[:, None])
    starts[:, 1] = 1
    ids = torch.where(ordinary, torch.cumsum(starts * ordinary, dim=1), torch.zeros_like(starts))
    last = (lengths - 1).clamp(min=0)
    n_words = ids.gather(1, (last - 1).clamp(min=0)[:, None]).squeeze(1)
    ids[torch.arange(B)[lengths > 1], last[lengths > 1]] = (n_words + 1)[lengths > 1]
    return ids.to(torch.int32)


def run_with_grads(fn, inputs: list[torch.Tensor], dout):
    """fn(*inputs) and the gradients of <fn(*inputs), dout> w.r.t. every input that requires one."""
    out = fn(*inputs)
    first = out[0] if isinstance(out, tuple) else out
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(first, leaves, dout)
    return out, list(grads)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    ours, ref = ours.detach(), ref.detach()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} != {ref.dtype}"
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    err = float((ours.double() - ref.double()).abs().max()) if ref.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"{what}: max error {err:.3e} vs max {scale:.3e} (tol {tol:g})"
