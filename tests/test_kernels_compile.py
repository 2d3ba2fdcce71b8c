"""Every Triton kernel compiles for sm_80 and sm_90 without a GPU, exactly as the wrappers launch it on CUDA.

The interpreter lets through what a GPU compile rejects (bf16 blocks, `tl.dot` shapes, shared memory). So a
child process without TRITON_INTERPRET runs each wrapper (forward and backward) on CPU tensors of the real
shapes and dtypes with every kernel launch intercepted: the wrappers pick their GPU blocks and bf16 stays
bf16. Each launch is specialized by Triton's own binder (dtypes, alignment, integers equal to 1), as a real
launch would be, and compiled for the target: what this compiles is what a GPU would run.
Reported per kernel: shared memory (checked against the architecture's limit), registers and stack frame.

    python tests/test_kernels_compile.py 90 [80 ...]   # prints one JSON line per compiled kernel
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernels

# max dynamic shared memory per block (bytes), CUDA programming guide
SHARED_LIMIT = {80: 166_912, 90: 232_448}
FP32_ARCH = 80  # fp32 launches are compiled for this one only, to keep the test short
EXPECTED = {"_bow_fwd_kernel", "_bow_dweight_kernel", "_bow_dhidden_kernel", "_attn_fwd_kernel",
            "_attn_delta_kernel", "_attn_dkdv_kernel", "_attn_dq_kernel", "liger_cross_entropy_kernel"}


def _record(calls) -> list[tuple]:
    """Run `calls` with every JIT launch recorded as (kernel, args, kwargs) instead of run."""
    from unittest import mock

    from triton.runtime.jit import JITFunction

    from dupmae.kernels import _triton_util, attention_triton, bow_triton, linear_ce

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


def _model_calls(dtype, B: int, L: int, D: int = 768, H: int = 12, V: int = 30522, N: int = 8):
    """The three ops at one shape, forward and backward, laid out as engine/model.py calls them."""
    import torch

    from dupmae.kernels import attention_triton, bow_triton, linear_ce

    def calls():
        g = torch.Generator().manual_seed(0)  # nothing is computed: values only feed the PyTorch glue
        hidden = torch.zeros(B, L, D, dtype=dtype, requires_grad=True)
        weight = torch.zeros(V, D, dtype=dtype, requires_grad=True)
        bias = torch.zeros(V, dtype=dtype, requires_grad=True)
        valid = torch.ones(B, L, dtype=torch.bool)
        mu, _ = bow_triton.bow_max_pool(hidden, weight, bias, valid)
        mu.backward(torch.ones_like(mu))
        d = D // H
        x = torch.zeros(B, L, D, dtype=dtype)
        seeds = torch.arange(B, dtype=torch.int64)
        word_ids = torch.arange(L, dtype=torch.int32).expand(B, L).contiguous()
        lengths = torch.full((B,), L, dtype=torch.int64)
        for dropout_p in (0.0, 0.1):
            q, k, v = (x.view(B, L, H, d).transpose(1, 2).detach().requires_grad_() for _ in range(3))
            out = attention_triton.decoder_attention(q, k, v, seeds, word_ids, lengths, 0.5, dropout_p)
            out.transpose(1, 2).reshape(B, L, D).backward(torch.ones(B, L, D, dtype=dtype))
        rows = torch.zeros(N, D, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, V, (N,), generator=g)
        linear_ce.linear_cross_entropy(rows, weight, bias, labels, reduction="sum").backward()

    return calls


def _resource_usage(cubin: bytes) -> dict:
    import re
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK):(\d+)", text))
    return {"registers": int(found.get("REG", -1)), "stack_bytes": int(found.get("STACK", -1))}


def compile_all(capabilities: list[int]) -> list[dict]:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    bf16 = _record(_model_calls(torch.bfloat16, B=2, L=512))  # BERT-base at L=512, the training dtype
    fp32 = _record(_model_calls(torch.float32, B=2, L=150))  # L=150: other strides; fp32: other blocks, IEEE dots
    results, seen = [], set()
    for cap in capabilities:
        target = GPUTarget("cuda", cap, 32)
        backend = make_backend(target)
        for kernel, args, kwargs in bf16 + (fp32 if cap == FP32_ARCH else []):
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            kwargs = dict(kwargs, debug=False)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
            key = (cap, kernel.__name__, repr(signature), repr(sorted(constexprs.items())), repr(attrs),
                   options.num_warps, options.num_stages)
            if key in seen:
                continue
            seen.add(key)
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
            dtypes = sorted({v for v in signature.values() if v.startswith("*") and "f" in v})
            named = {kernel.arg_names[p[0]]: v for p, v in constexprs.items() if kernel.arg_names[p[0]].isupper()}
            results.append({"arch": cap, "kernel": kernel.__name__, "dtypes": dtypes,
                            "constexprs": {k: str(v) for k, v in named.items()},
                            "num_warps": options.num_warps, "num_stages": options.num_stages,
                            "shared": compiled.metadata.shared, **_resource_usage(compiled.asm["cubin"])})
    return results


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    pytest.importorskip("triton")
    pytest.importorskip("liger_kernel")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run(cap: int) -> list[dict]:
        proc = subprocess.run([sys.executable, __file__, str(cap)], env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    with ThreadPoolExecutor(2) as pool:  # one process per architecture
        return [r for rs in pool.map(run, (80, 90)) for r in rs]


def test_every_kernel_compiles_for_sm80_and_sm90_in_bf16_and_for_sm80_in_fp32(compiled):
    for cap, dtype in ((80, "*bf16"), (90, "*bf16"), (FP32_ARCH, "*fp32")):
        names = {r["kernel"] for r in compiled if r["arch"] == cap and dtype in r["dtypes"]}
        assert names == EXPECTED, f"sm_{cap} {dtype}: missing {EXPECTED - names}"
    dropout = {r["constexprs"].get("DROPOUT") for r in compiled if r["kernel"] == "_attn_fwd_kernel"}
    assert dropout == {"True", "False"}


def test_shared_memory_fits_and_registers_are_reported(compiled):
    for r in compiled:
        assert 0 < r["registers"] <= 255, r
        assert r["shared"] <= SHARED_LIMIT[r["arch"]], r
    print()
    for r in sorted(compiled, key=lambda r: (r["arch"], r["kernel"], r["dtypes"])):
        print(f"sm_{r['arch']} {r['kernel']:28} {','.join(r['dtypes']):12} warps {r['num_warps']} "
              f"stages {r['num_stages']} shared {r['shared']:6} regs {r['registers']:3} stack {r['stack_bytes']}")


if __name__ == "__main__":
    for row in compile_all([int(c) for c in sys.argv[1:]]):
        print(json.dumps(row), flush=True)
