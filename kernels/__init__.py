"""dupmae.kernels: DupMAE's hot ops and their dispatch.

Each op has one plain-PyTorch definition in `reference.py` (the specification and the CPU path) and a Triton
implementation (`bow_triton.py`, `attention_triton.py`, `linear_ce.py`: Liger-Kernel), used automatically for
fp32/bf16/fp16 CUDA tensors. `DUPMAE_KERNELS=reference` (or `impl="reference"`, the model's
`model.kernels`) forces the reference; `DUPMAE_KERNELS=triton` (or `impl="triton"`) demands Triton and fails
clearly without it (on CPU it needs TRITON_INTERPRET=1 and runs in Triton's interpreter, for tests).
Triton and Liger are imported on first use only, so this package imports wherever torch does. It imports
nothing from the rest of dupmae. See kernels/README.md.
"""
from __future__ import annotations

import os

import torch

from . import reference

IMPL_ENV = "DUPMAE_KERNELS"
IMPLS = ("auto", "reference", "triton")
_AUTO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON: dict | None = None  # op name -> Triton implementation, filled on first use


def _triton_ops() -> dict:
    """The Triton implementations this installation can run: none without triton, no linear CE without Liger."""
    global _TRITON
    if _TRITON is None:
        import importlib.util

        ops: dict = {}
        if importlib.util.find_spec("triton") is not None:
            from .attention_triton import decoder_attention as triton_attention
            from .bow_triton import bow_max_pool as triton_bow

            ops = {"bow_max_pool": triton_bow, "decoder_attention": triton_attention}
            if importlib.util.find_spec("liger_kernel") is not None:
                from .linear_ce import linear_cross_entropy as liger_ce

                ops["linear_cross_entropy"] = liger_ce
        _TRITON = ops
    return _TRITON


def resolve_impl(op: str, tensor: torch.Tensor, impl: str | None = None) -> str:
    """'reference' or 'triton' for this op on this tensor's device. An explicit `impl` other than "auto" wins;
    otherwise $DUPMAE_KERNELS decides, by default "auto"."""
    explicit = impl not in (None, "auto")
    choice = impl if explicit else os.environ.get(IMPL_ENV, "auto")
    if choice not in IMPLS:
        raise ValueError(f"kernel implementation must be one of {', '.join(IMPLS)}, got {choice!r} "
                         f"(from {'impl=' if explicit else IMPL_ENV})")
    if choice == "reference":
        return "reference"
    if choice == "triton":
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"Triton {op} needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
        if op not in _triton_ops():
            raise RuntimeError(f"no Triton implementation of {op} here (is triton, and for linear_cross_entropy "
                               f"liger-kernel, installed?); use {IMPL_ENV}=reference")
        return "triton"
    # auto: Triton where it is compiled (CUDA) and its precision is the reference's (not float64)
    return "triton" if tensor.is_cuda and tensor.dtype in _AUTO_DTYPES and op in _triton_ops() else "reference"


def bow_max_pool(hidden, weight, bias, valid, impl: str | None = None, **kw):
    if resolve_impl("bow_max_pool", hidden, impl) == "triton":
        return _triton_ops()["bow_max_pool"](hidden, weight, bias, valid, **kw)
    return reference.bow_max_pool(hidden, weight, bias, valid, **kw)


def linear_cross_entropy(hidden, weight, bias, labels, impl: str | None = None, **kw):
    if resolve_impl("linear_cross_entropy", hidden, impl) == "triton":
        return _triton_ops()["linear_cross_entropy"](hidden, weight, bias, labels, **kw)
    return reference.linear_cross_entropy(hidden, weight, bias, labels, **kw)


def decoder_attention(q, k, v, seeds, word_ids, lengths, p_dec=0.5, dropout_p=0.0, impl: str | None = None, **kw):
    if resolve_impl("decoder_attention", q, impl) == "triton":
        return _triton_ops()["decoder_attention"](q, k, v, seeds, word_ids, lengths, p_dec, dropout_p, **kw)
    return reference.decoder_attention(q, k, v, seeds, word_ids, lengths, p_dec, dropout_p, **kw)


bow_loss = reference.bow_loss

__all__ = ["bow_max_pool", "bow_loss", "linear_cross_entropy", "decoder_attention", "resolve_impl", "IMPL_ENV"]
