"""dupmae.kernels: DupMAE's hot ops and their dispatch.

Each op has one plain-PyTorch definition in `reference.py` (the specification and the CPU path). A Triton
implementation is used on CUDA where one exists; `DUPMAE_KERNELS=reference` (or `impl="reference"`) forces
the reference, `DUPMAE_KERNELS=triton` (or `impl="triton"`) demands Triton and fails clearly without it.
This package imports nothing from the rest of dupmae.
"""
from __future__ import annotations

import os

import torch

from . import reference

IMPL_ENV = "DUPMAE_KERNELS"
IMPLS = ("auto", "reference", "triton")
# op name -> Triton implementation; filled as Triton kernels land
_TRITON: dict = {}


def resolve_impl(op: str, tensor: torch.Tensor, impl: str | None = None) -> str:
    """'reference' or 'triton' for this op on this tensor's device."""
    choice = impl or os.environ.get(IMPL_ENV, "auto")
    if choice not in IMPLS:
        raise ValueError(f"kernel implementation must be one of {', '.join(IMPLS)}, got {choice!r} "
                         f"(from {'impl=' if impl else IMPL_ENV})")
    if choice == "reference":
        return "reference"
    if choice == "triton":
        if op not in _TRITON:
            raise RuntimeError(f"no Triton implementation of {op} in this version; use {IMPL_ENV}=reference")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"Triton {op} needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
        return "triton"
    return "triton" if tensor.is_cuda and op in _TRITON else "reference"


def bow_max_pool(hidden, weight, bias, valid, impl: str | None = None, **kw):
    if resolve_impl("bow_max_pool", hidden, impl) == "triton":
        return _TRITON["bow_max_pool"](hidden, weight, bias, valid, **kw)
    return reference.bow_max_pool(hidden, weight, bias, valid, **kw)


def linear_cross_entropy(hidden, weight, bias, labels, impl: str | None = None, **kw):
    if resolve_impl("linear_cross_entropy", hidden, impl) == "triton":
        return _TRITON["linear_cross_entropy"](hidden, weight, bias, labels, **kw)
    return reference.linear_cross_entropy(hidden, weight, bias, labels, **kw)


def decoder_attention(q, k, v, seeds, word_ids, lengths, p_dec=0.5, dropout_p=0.0, impl: str | None = None, **kw):
    if resolve_impl("decoder_attention", q, impl) == "triton":
        return _TRITON["decoder_attention"](q, k, v, seeds, word_ids, lengths, p_dec, dropout_p, **kw)
    return reference.decoder_attention(q, k, v, seeds, word_ids, lengths, p_dec, dropout_p, **kw)


bow_loss = reference.bow_loss

__all__ = ["bow_max_pool", "bow_loss", "linear_cross_entropy", "decoder_attention", "resolve_impl", "IMPL_ENV"]
