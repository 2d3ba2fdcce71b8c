"""Time and peak memory of DupMAE's three hot ops, each beside the paths it replaces.

    python benchmarks/bench_kernels.py              # GPU: L=512 (B=32) and L=150 (B=128), bf16, all providers
    python benchmarks/bench_kernels.py --small      # CPU: the same ops at reduced shapes, PyTorch providers only

Providers, per op (same inputs, same output):
  naive      the plain PyTorch path: full B x L x V logits (bow_max_pool, linear CE), or an explicit B x L x L
             mask built with the Philox port, then SDPA (decoder_attention)
  reference  the chunked PyTorch path of kernels/reference.py (the CPU path)
  compile    torch.compile of the naive path
  triton     kernels/bow_triton.py, attention_triton.py, linear_ce.py (Liger-Kernel); CUDA only
Shapes (BERT-base: D=768, 12 heads, V=30,522): L=512 B=32 and L=150 B=128; `--small` divides B by 16 and D
by 3 (4 heads). bow_max_pool pools positions 1..len-1 of lengths drawn in [0.75 L, L]; linear CE has one row
per ordinary token (the decoder's L_dec, the larger of the two CE losses).

Measured per (op, provider, shape): forward, and forward+backward, p20/p50/p80 over --repeats calls after
warm-up; peak memory of forward+backward above what the inputs already hold (CUDA: the allocator's peak;
CPU: the process's resident high-water mark, each (op, provider, shape) in a fresh process). For bow_max_pool
on CUDA also TFLOP/s (2 B L V D per forward) and its share of cuBLAS's bf16 throughput on the same GEMM.
Rows are appended to benchmarks/results/kernels.csv with device, dtype, commit, date and the command.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from benchutil import commit  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "kernels.csv"
OPS = ("bow_max_pool", "decoder_attention", "linear_cross_entropy")
PROVIDERS = ("naive", "reference", "compile", "triton")
SHAPES = {"L512": dict(B=32, L=512), "L150": dict(B=128, L=150)}
D, H, V = 768, 12, 30522
FIELDS = ["date", "device", "commit", "dtype", "op", "provider", "shape", "B", "L", "D", "H", "V",
          "fwd_p20_ms", "fwd_p50_ms", "fwd_p80_ms", "fwdbwd_p20_ms", "fwdbwd_p50_ms", "fwdbwd_p80_ms",
          "peak_mb", "tflops", "pct_of_cublas", "note", "command"]


def dims(shape: str, small: bool) -> dict:
    s = dict(SHAPES[shape], D=D, H=H, V=V)
    if small:
        s.update(B=max(1, s["B"] // 16), D=D // 3, H=H // 3)
    return s


# -- inputs and the providers of each op --------------------------------------------------------------------

def draw_lengths(B: int, L: int, g):
    """The B sequence lengths of a case, in [0.75 L, L]: the first draw of the case's generator (seed 0)."""
    import torch

    return torch.randint(int(0.75 * L), L + 1, (B,), generator=g)


def make_case(op: str, s: dict, dtype, device):
    """(inputs, {provider: fn(*inputs) -> tensor to differentiate}, gradient for that tensor or None)."""
    import torch
    import torch.nn.functional as F

    from dupmae.kernels import philox, reference

    g = torch.Generator().manual_seed(0)
    B, L, Dm, Hh, Vv = s["B"], s["L"], s["D"], s["H"], s["V"]
    lengths = draw_lengths(B, L, g)
    col = torch.arange(L)[None, :]

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

    if op == "bow_max_pool":
        valid = ((col > 0) & (col < lengths[:, None])).to(device)
        inputs = [t(B, L, Dm), t(Vv, Dm, scale=Dm**-0.5), t(Vv), valid]

        def naive(h, w, b, valid):
            logits = torch.matmul(h, w.t()) + b
            return logits.masked_fill(~valid[:, :, None], float("-inf")).max(dim=1).values

        fns = {"naive": naive, "reference": lambda *a: reference.bow_max_pool(*a)[0]}
        fns["triton"] = lambda *a: _triton("bow_max_pool")(*a)[0]
        return inputs, fns, torch.randn(B, Vv, generator=g).to(device, dtype)

    if op == "decoder_attention":
        d = Dm // Hh
        q = torch.randn(B, L, Hh, d, generator=g).to(device, dtype).transpose(1, 2).requires_grad_()
        words = torch.cumsum(torch.rand(B, L, generator=g) > 0.3, 1).to(torch.int32)
        seeds = torch.randint(0, 2**62, (B,), generator=g)
        inputs = [q, t(B, Hh, L, d), t(B, Hh, L, d), seeds.to(device), words.to(device), lengths.to(device)]

        def naive(q, k, v, seeds, words, lengths):
            mask = philox.decoder_visibility(seeds, words, lengths, 0.5)  # B x L x L, explicit
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])

        fns = {"naive": naive, "reference": lambda *a: reference.decoder_attention(*a, 0.5)}
        fns["triton"] = lambda *a: _triton("decoder_attention")(*a, 0.5)
        return inputs, fns, torch.randn(B, Hh, L, d, generator=g).to(device, dtype)

    n = int((lengths - 2).sum())  # the decoder's rows: every ordinary token
    labels = torch.randint(0, Vv, (n,), generator=g).to(device)
    inputs = [t(n, Dm), t(Vv, Dm, scale=Dm**-0.5), t(Vv), labels]

    def naive_ce(h, w, b, y):
        return F.cross_entropy((torch.matmul(h, w.t()) + b).float(), y, reduction="sum")

    fns = {"naive": naive_ce, "reference": lambda *a: reference.linear_cross_entropy(*a, reduction="sum")}
    fns["triton"] = lambda *a: _triton("linear_cross_entropy")(*a, reduction="sum")
    return inputs, fns, None


def _triton(op: str):
    from dupmae.kernels import attention_triton, bow_triton, linear_ce

    return {"bow_max_pool": bow_triton.bow_max_pool, "decoder_attention": attention_triton.decoder_attention,
            "linear_cross_entropy": linear_ce.linear_cross_entropy}[op]


# -- measuring ----------------------------------------------------------------------------------------------

class Clock:
    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def __call__(self, fn) -> float:
        """Milliseconds of one call of fn."""
        if self.cuda:
            start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def _quantiles(xs: list[float]) -> list[float]:
    import numpy as np

    return [float(np.quantile(xs, q)) for q in (0.2, 0.5, 0.8)]


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(op: str, provider: str, shape: str, small: bool, dtype_name: str, repeats: int) -> dict:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype_name])
    s = dims(shape, small)
    inputs, fns, dout = make_case(op, s, dtype, device)
    fn = fns["naive"] if provider == "compile" else fns[provider]
    if provider == "compile":
        fn = torch.compile(fn)
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        out = fn(*inputs)
        torch.autograd.grad(out, leaves, dout)

    clock = Clock(device)
    warm = 3 if device.type == "cuda" else 1
    for _ in range(warm):
        forward_backward()
        forward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident high-water mark
        base = _rss_mb("VmRSS")
        forward_backward()
        peak = _rss_mb("VmHWM") - base
    fwd = _quantiles([clock(forward) for _ in range(repeats)])
    both = _quantiles([clock(forward_backward) for _ in range(repeats)])
    row = {"op": op, "provider": provider, "shape": shape + ("/small" if small else ""), **s,
           "fwd": fwd, "fwdbwd": both, "peak_mb": peak, "tflops": None, "pct_of_cublas": None}
    if op == "bow_max_pool" and device.type == "cuda":
        flops = 2 * s["B"] * s["L"] * s["V"] * s["D"]
        row["tflops"] = flops / (fwd[1] * 1e-3) / 1e12
        h, w = inputs[0].detach().reshape(-1, s["D"]), inputs[1].detach()
        cublas = _quantiles([clock(lambda: torch.matmul(h, w.t())) for _ in range(repeats)])[1]
        row["pct_of_cublas"] = 100 * (flops / (fwd[1] * 1e-3)) / (flops / (cublas * 1e-3))
    return row


# -- driver -------------------------------------------------------------------------------------------------

def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.node()} {os.cpu_count()} cpu, no GPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="reduced shapes (B / 16, D / 3): the CPU setting")
    ap.add_argument("--op", choices=OPS, action="append")
    ap.add_argument("--shape", choices=tuple(SHAPES), action="append")
    ap.add_argument("--provider", choices=PROVIDERS, action="append")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per pass (default 30 CUDA, 5 CPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument("--out-csv", type=Path, default=RESULTS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    import torch

    cuda = torch.cuda.is_available()
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    repeats = args.repeats or (30 if cuda else 5)
    providers = [p for p in (args.provider or PROVIDERS) if (p != "triton" or cuda) and not (
        p == "compile" and args.no_compile)]
    device, stamp = device_name(), (dt.date.today().isoformat(), commit())
    command = "python benchmarks/bench_kernels.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows = []
    for shape in args.shape or tuple(SHAPES):
        for op in args.op or OPS:
            for provider in providers:
                spec = dict(op=op, provider=provider, shape=shape, small=args.small, dtype_name=dtype, repeats=repeats)
                try:
                    if cuda:  # the allocator's peak is exact in one process
                        r = measure(**spec)
                        torch.cuda.empty_cache()
                    else:  # a fresh process each, so resident-memory peaks do not mix
                        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                             capture_output=True, text=True, check=True)
                        r = json.loads(out.stdout.strip().splitlines()[-1])
                    r["note"] = ""
                except (RuntimeError, subprocess.CalledProcessError) as e:  # e.g. out of memory: recorded, not fatal
                    msg = getattr(e, "stderr", None) or str(e)
                    r = dict(op=op, provider=provider, shape=shape + ("/small" if args.small else ""),
                             **dims(shape, args.small), fwd=[math.nan] * 3, fwdbwd=[math.nan] * 3, peak_mb=math.nan,
                             tflops=None, pct_of_cublas=None, note="failed: " + msg.strip().splitlines()[-1][:200])
                rows.append(r)
                extra = f"  {r['tflops']:.0f} TFLOP/s ({r['pct_of_cublas']:.0f}% of cuBLAS)" if r["tflops"] else ""
                print(f"{r['shape']:10} {op:21} {provider:9} fwd {r['fwd'][1]:9.2f} ms  fwd+bwd {r['fwdbwd'][1]:9.2f} ms"
                      f"  peak {r['peak_mb']:8.0f} MB{extra} {r['note']}", flush=True)
    new = not args.out_csv.exists()
    args.out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out_csv, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(FIELDS)
        for r in rows:
            w.writerow([stamp[0], device, stamp[1], dtype, r["op"], r["provider"], r["shape"], r["B"], r["L"], r["D"],
                        r["H"], r["V"], *(f"{x:.3f}" for x in r["fwd"]), *(f"{x:.3f}" for x in r["fwdbwd"]),
                        f"{r['peak_mb']:.0f}", "" if r["tflops"] is None else f"{r['tflops']:.1f}",
                        "" if r["pct_of_cublas"] is None else f"{r['pct_of_cublas']:.1f}", r["note"], command])
    summary(rows)


def summary(rows: list[dict]) -> None:
    """Ratios to the naive path: the issue's goals (bow >= 1.5x faster and >= 10x less memory; attention >= 3x
    faster) are about the triton rows; on CPU the table compares the PyTorch paths."""
    for shape in sorted({r["shape"] for r in rows}):
        for op in OPS:
            naive = next((r for r in rows if r["shape"] == shape and r["op"] == op and r["provider"] == "naive"), None)
            if naive is None:
                continue
            for r in rows:
                if r["shape"] == shape and r["op"] == op and r["provider"] != "naive":
                    print(f"{shape:10} {op:21} {r['provider']:9} vs naive: fwd+bwd "
                          f"{naive['fwdbwd'][1] / r['fwdbwd'][1]:5.2f}x faster, "
                          f"{naive['peak_mb'] / max(r['peak_mb'], 1e-9):6.1f}x less memory")


if __name__ == "__main__":
    main()
