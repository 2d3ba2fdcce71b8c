"""bf16 against fp32 on this CPU: matrix products by layout, a pre-training step, an encoding pass.

    python benchmarks/bench_bf16_cpu.py              # appends to benchmarks/results/bf16_cpu.csv
    python benchmarks/bench_bf16_cpu.py --threads 2

Rows: (1) `a @ b` in the five layouts a BERT's forward and backward use (x W^T, grad_x = g W, grad_W = g^T x,
...), M=2048 K=256 N=1024, GFLOP/s; (2) forward + backward of the pre-training model of
benchmarks/pretraining_helps.py's CPU preset (4 x 256, V = 8,192, B = 16, L = 128, reference kernels), the
model's weights in the dtype (as DeepSpeed's bf16 mode holds them); (3) an encoding pass (forward, no
gradient) of the same encoder. Each number is the median of --repeats runs after a warm-up. Whether bf16 pays
off depends on the CPU: with AVX512-BF16 or AMX the products run natively (about 2x fp32); without them
PyTorch emulates them, and the trainer warns (engine/metrics.py: cpu_bf16_native).
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bf16_cpu.csv"


def timed(f, repeats: int) -> float:
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import numpy as np
    import torch

    from dupmae.data_pipeline.collator import DupMAECollator
    from dupmae.data_pipeline.tokenizer import tokenizer_info
    from dupmae.engine.metrics import cpu_bf16_native, cpu_flags
    from dupmae.engine.model import DupMAE, ModelConfig

    torch.set_num_threads(args.threads)
    rows = []
    M, K, N = 2048, 256, 1024
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(M, K, generator=g).to(dtype), torch.randn(K, N, generator=g).to(dtype)
        a_t, b_t = a.t().contiguous(), b.t().contiguous()
        c = torch.randn(M, N, generator=g).to(dtype)
        for name, f in (("matmul a@b", lambda: a @ b), ("matmul a@(b^T)^T (x W^T)", lambda: a @ b_t.t()),
                        ("matmul (a^T)^T@b", lambda: a_t.t() @ b), ("matmul c^T@a (grad W)", lambda: c.t() @ a),
                        ("matmul c@b^T (grad x)", lambda: c @ b.t())):
            s = timed(f, args.repeats)
            rows.append((name, str(dtype).split(".")[-1], s, 2 * M * K * N / s / 1e9, "GFLOP/s"))

    info = copy.copy(tokenizer_info())
    vocab = 8192
    object.__setattr__(info, "vocab_size", vocab)
    rng = np.random.default_rng(0)
    batch = DupMAECollator(info, seed=0, max_len=128)(
        [(i, rng.integers(5, vocab, size=126).astype(np.uint16)) for i in range(16)])
    tokens = int(batch["lengths"].sum())
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = DupMAE.from_config(ModelConfig(encoder_config=dict(
            vocab_size=vocab, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            max_position_embeddings=128), kernels="reference")).to(dtype).train()

        def step():
            model.zero_grad(set_to_none=True)
            model(batch).loss.backward()

        s = timed(step, args.repeats)
        rows.append(("pre-training step 4x256 V=8192 B=16 L=128", str(dtype).split(".")[-1], s, tokens / s,
                     "tokens/s"))
        model.eval()

        def encode():
            with torch.no_grad():
                model.lm.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

        s = timed(encode, args.repeats)
        rows.append(("encoding pass 4x256 B=16 L=128", str(dtype).split(".")[-1], s, tokens / s, "tokens/s"))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    model_name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                      platform.processor())
    isa = ",".join(sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})) or "-"
    machine = f"{platform.node()} {model_name} ({isa}), {args.threads} threads"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new = not RESULTS.exists()
    with open(RESULTS, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "machine", "commit", "bf16_native", "what", "dtype", "seconds", "rate", "unit"])
        for what, dtype, s, rate, unit in rows:
            w.writerow([dt.date.today().isoformat(), machine, commit, cpu_bf16_native(), what, dtype, f"{s:.4f}",
                        f"{rate:.1f}", unit])
    fp32 = {r[0]: r[3] for r in rows if r[1] == "float32"}
    print(f"{machine}; bf16 native: {cpu_bf16_native()}")
    for what, dtype, s, rate, unit in rows:
        if dtype == "bfloat16":
            print(f"{what:45} fp32 {fp32[what]:10.1f}  bf16 {rate:10.1f} {unit:9} bf16/fp32 {rate / fp32[what]:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
