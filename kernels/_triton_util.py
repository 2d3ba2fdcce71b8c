"""What the Triton kernels' wrappers share: dtypes, dot precision, and the interpreter's bf16 workaround."""
from __future__ import annotations

import torch
import triton.language as tl

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def tl_dtype(dtype: torch.dtype):
    return _TL[dtype]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for 16- and 32-bit inputs, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision. It only matters for fp32 operands, which follow torch's own setting: TF32
    only where `torch.set_float32_matmul_precision` allows it, as for torch.matmul."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def interpreting(t: torch.Tensor) -> bool:
    """A CPU tensor reaches a Triton kernel only through the interpreter (TRITON_INTERPRET=1)."""
    return t.device.type == "cpu"


def upcast_for_interpreter(*tensors):
    """The interpreter computes bf16 (and fp16) blocks wrongly without an error: run them in fp32 and cast the
    results back. Returns the (possibly) upcast tensors and a function restoring a result's dtype."""
    low = next((t.dtype for t in tensors if t is not None and t.dtype in (torch.bfloat16, torch.float16)), None)
    if low is None:
        return tensors, lambda x: x
    ups = tuple(t.float() if t is not None and t.is_floating_point() else t for t in tensors)
    return ups, lambda x: x.to(low)


def launch_config(t: torch.Tensor, gpu: dict, interp: dict) -> tuple[dict, dict]:
    """(block constexprs, launch options) for a kernel whose inputs are like `t`. `gpu` holds one setting for
    16-bit inputs ("16bit", tensor cores) and one for 32/64-bit ones ("fp32": smaller blocks, because IEEE fp32
    dots run on the FMA units and hold far more registers)."""
    cfg = dict(interp if interpreting(t) else gpu["16bit" if t.element_size() == 2 else "fp32"])
    return cfg, {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
