"""Ahead-of-time compilation of DupMAE's Triton kernels for a GPU target, on a machine without a GPU.

The interpreter lets through what a GPU compile rejects (bf16 blocks, `tl.dot` shapes, shared memory), and it
says nothing about speed. This module runs the kernels' wrappers (forward and backward) on CPU tensors of the
real shapes and dtypes with every kernel launch intercepted, so the wrappers pick their GPU blocks and bf16
stays bf16; each launch is specialized by Triton's own binder (dtypes, alignment, integers equal to 1), as a
real launch would be, and compiled for the target: what this compiles is what a GPU would run.

Used by tests/test_kernels_compile.py (every kernel compiles for sm_80 and sm_90 and fits shared memory;
registers and stack are reported) and benchmarks/sass_model.py (a static performance model read off the SASS).
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# max dynamic shared memory per block (bytes), CUDA programming guide
SHARED_LIMIT = {80: 166_912, 90: 232_448}


def record_launches(calls: Callable[[], None]) -> list[tuple]:
    """Run `calls` with every JIT launch recorded as (kernel, args, kwargs) instead of run."""
    from unittest import mock

    from triton.runtime.jit import JITFunction

    from . import _triton_util, attention_triton, bow_triton, linear_ce

    launches = []

    def fake_run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    not_cpu = lambda t: False  # noqa: E731 - the CPU tensors stand in for CUDA ones
    with mock.patch.object(JITFunction, "run", fake_run), \
            mock.patch.object(_triton_util, "interpreting", not_cpu), \
            mock.patch.object(bow_triton, "interpreting", not_cpu), \
            mock.patch.object(attention_triton, "interpreting", not_cpu), \
            mock.patch.object(linear_ce, "interpreting", not_cpu):
        calls()
    return launches


OPS = ("bow_max_pool", "decoder_attention", "linear_cross_entropy")


def model_calls(dtype, B: int, L: int, D: int = 768, H: int = 12, V: int = 30522, N: int = 8,
                dropout: tuple[float, ...] = (0.0, 0.1), ops: tuple[str, ...] = OPS) -> Callable[[], None]:
    """The three ops (or those in `ops`) at one shape, forward and backward, laid out as engine/model.py calls
    them (attention once per dropout probability in `dropout`)."""
    import torch

    from . import attention_triton, bow_triton, linear_ce

    def calls():
        g = torch.Generator().manual_seed(0)  # nothing is computed: values only feed the PyTorch glue
        hidden = torch.zeros(B, L, D, dtype=dtype, requires_grad=True)
        weight = torch.zeros(V, D, dtype=dtype, requires_grad=True)
        bias = torch.zeros(V, dtype=dtype, requires_grad=True)
        if "bow_max_pool" in ops:
            mu, _ = bow_triton.bow_max_pool(hidden, weight, bias, torch.ones(B, L, dtype=torch.bool))
            mu.backward(torch.ones_like(mu))
        d = D // H
        x = torch.zeros(B, L, D, dtype=dtype)
        seeds = torch.arange(B, dtype=torch.int64)
        word_ids = torch.arange(L, dtype=torch.int32).expand(B, L).contiguous()
        lengths = torch.full((B,), L, dtype=torch.int64)
        for dropout_p in dropout if "decoder_attention" in ops else ():
            q, k, v = (x.view(B, L, H, d).transpose(1, 2).detach().requires_grad_() for _ in range(3))
            out = attention_triton.decoder_attention(q, k, v, seeds, word_ids, lengths, 0.5, dropout_p)
            out.transpose(1, 2).reshape(B, L, D).backward(torch.ones(B, L, D, dtype=dtype))
        if "linear_cross_entropy" in ops:
            rows = torch.zeros(N, D, dtype=dtype, requires_grad=True)
            labels = torch.randint(0, V, (N,), generator=g)
            linear_ce.linear_cross_entropy(rows, weight, bias, labels, reduction="sum").backward()

    return calls


@dataclass
class Compiled:
    arch: int
    kernel: str
    dtypes: list[str]  # the pointer dtypes of its floating-point arguments, e.g. ["*bf16"]
    constexprs: dict[str, str]  # the upper-case (block and switch) constexprs
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory
    cubin: bytes

    def row(self) -> dict:
        return {"arch": self.arch, "kernel": self.kernel, "dtypes": self.dtypes, "constexprs": self.constexprs,
                "num_warps": self.num_warps, "num_stages": self.num_stages, "shared": self.shared,
                **resource_usage(self.cubin)}


def compile_launches(launches: list[tuple], arch: int) -> Iterator[Compiled]:
    """Compile each distinct recorded launch for sm_`arch`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    seen = set()
    for kernel, args, kwargs in launches:
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        kwargs = dict(kwargs, debug=False)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        key = (kernel.__name__, repr(signature), repr(sorted(constexprs.items())), repr(attrs),
               options.num_warps, options.num_stages)
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        named = {kernel.arg_names[p[0]]: v for p, v in constexprs.items() if kernel.arg_names[p[0]].isupper()}
        yield Compiled(arch=arch, kernel=kernel.__name__,
                       dtypes=sorted({v for v in signature.values() if v.startswith("*") and "f" in v}),
                       constexprs={k: str(v) for k, v in named.items()}, num_warps=options.num_warps,
                       num_stages=options.num_stages, shared=compiled.metadata.shared, cubin=compiled.asm["cubin"])


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _on_cubin(tool: str, flags: list[str], cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool(tool), *flags, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack bytes (spills show up as a non-zero stack)."""
    found = dict(re.findall(r"\b(REG|STACK):(\d+)", _on_cubin("cuobjdump", ["--dump-resource-usage"], cubin)))
    return {"registers": int(found.get("REG", -1)), "stack_bytes": int(found.get("STACK", -1))}


_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):\s*$")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def sass(cubin: bytes) -> list[tuple[str, str]]:
    """The kernel's SASS as (opcode with modifiers, operands), in order; labels as ("LABEL", name)."""
    out = []
    for line in _on_cubin("nvdisasm", ["-c"], cubin).splitlines():
        if m := _LABEL.match(line):
            out.append(("LABEL", m.group(1)))
        elif m := _INSTRUCTION.match(line):
            out.append((m.group(1), m.group(2)))
    return out


def loops(code: list[tuple[str, str]]) -> list[tuple[int, int]]:
    """The loops of a SASS listing as (first, last) instruction indices: a branch back to a label. Nested
    loops are reported separately (the outer one contains the inner one's instructions once)."""
    labels, found = {}, []
    for i, (op, rest) in enumerate(code):
        if op == "LABEL":
            labels[rest] = i
        elif op.startswith("BRA") and (t := _TARGET.search(rest)) and labels.get(t.group(1), i) < i:
            found.append((labels[t.group(1)], i))
    return found
