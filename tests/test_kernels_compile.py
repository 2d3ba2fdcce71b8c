"""Every Triton kernel compiles for sm_80 and sm_90 without a GPU, exactly as the wrappers launch it on CUDA.

`dupmae.kernels.aot` runs each wrapper (forward and backward) on CPU tensors of the real shapes and dtypes with
every kernel launch intercepted and compiles each launch, as Triton's binder specializes it, for the target.
Reported per kernel: shared memory (checked against the architecture's limit), registers and stack frame.

    python tests/test_kernels_compile.py 90 [80 ...]   # prints one JSON line per compiled kernel
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.kernels

FP32_ARCH = 80  # fp32 launches are compiled for this one only, to keep the test short
EXPECTED = {"_bow_fwd_kernel", "_bow_dweight_kernel", "_bow_dhidden_kernel", "_attn_fwd_kernel",
            "_attn_delta_kernel", "_attn_dkdv_kernel", "_attn_dq_kernel", "liger_cross_entropy_kernel"}


def compile_all(capabilities: list[int]) -> list[dict]:
    import torch

    from dupmae.kernels import aot

    bf16 = aot.record_launches(aot.model_calls(torch.bfloat16, B=2, L=512))  # BERT-base at L=512, the training dtype
    bf16 += aot.record_launches(aot.model_calls(torch.bfloat16, B=2, L=150, ops=("bow_max_pool",)))  # short tiles
    fp32 = aot.record_launches(aot.model_calls(torch.float32, B=2, L=150))  # other strides; IEEE dots, other blocks
    return [c.row() for cap in capabilities
            for c in aot.compile_launches(bf16 + (fp32 if cap == FP32_ARCH else []), cap)]


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
    from dupmae.kernels import aot

    blocks = {r["constexprs"]["BLOCK_L"] for r in compiled if r["kernel"] == "_bow_fwd_kernel" and r["arch"] == 90}
    assert blocks == {"128", "64"}, blocks  # long and short sequences
    for r in compiled:
        assert 0 < r["registers"] <= 255, r
        assert r["shared"] <= aot.SHARED_LIMIT[r["arch"]], r
    print()
    for r in sorted(compiled, key=lambda r: (r["arch"], r["kernel"], r["dtypes"])):
        print(f"sm_{r['arch']} {r['kernel']:28} {','.join(r['dtypes']):12} warps {r['num_warps']} "
              f"stages {r['num_stages']} shared {r['shared']:6} regs {r['registers']:3} stack {r['stack_bytes']}")


if __name__ == "__main__":
    for row in compile_all([int(c) for c in sys.argv[1:]]):
        print(json.dumps(row), flush=True)
