"""A static performance model of the Triton kernels on an H100, read off their compiled SASS: no GPU needed.

    python benchmarks/sass_model.py          # sm_90, bf16, BERT-base shapes (bench_kernels.py's L512 and L150)

Why: the speed goals of the kernels are measured by bench_kernels.py on a GPU; where none is lent, this says
where each kernel's time goes and whether a goal is at risk, from what the compiler actually emitted.

How, per kernel (`dupmae.kernels.aot` compiles every launch as the wrappers make it, for sm_90):
- Its loops are found in the SASS (a branch back to a label) and their instructions counted per warp, by the
  unit that executes them. Cycles of one loop iteration on one of the SM's 4 sub-partitions (each holds
  num_warps / 4 of the program's warps) = max over: issue (1 cycle per instruction), the FMA pipe (FP32
  add/mul/fma 1 cycle, IMAD 2), the integer/logic pipe (2), conversions and MUFU (8), shuffles (4): the
  per-SM throughputs of the CUDA programming guide's arithmetic-instruction table for compute capability 9.0
  (128, 64, 16 and 32 per clock). Uniform-datapath, memory and control instructions count for issue only.
- Tensor cycles of the iteration = the larger of its tl.dot FLOPs / 4096 (dense bf16 per SM per clock:
  989 TFLOP/s at 1.83 GHz on 132 SMs) and the shared-memory bytes its dots read / 128 (per SM per clock),
  counting both operands of every dot as read from shared memory, the B operand once per warpgroup (an
  upper bound: Triton keeps some A operands in registers). Small tiles are bound by the second. "serial"
  adds tensor and scalar cycles (the softmax waits for its QK^T, the next dot for the softmax: Triton does not
  ping-pong warpgroups); "overlap" takes the larger (the best case).
- Whole op = iterations (from the real grid, block sizes and the lengths bench_kernels.py draws) x cycles /
  (132 SMs x 1.83 GHz). Not modelled: memory bandwidth and latency, prologues and epilogues outside loops,
  wave quantization, launch overhead, the PyTorch glue (the backward's sort). So a kernel row is a LOWER
  bound unless its loop is compute-bound, and the memory-gather loops of the BoW backward are surely
  optimistic.
- The naive paths bench_kernels.py compares with get a roofline LOWER bound: every aten op they run (traced
  on the meta device, forward and backward) costs at least max(its matmul FLOPs at the tensor-core peak, the
  bytes it reads and writes at 3.35 TB/s); for attention the fused SDPA kernel is credited with its FLOPs
  at peak and nothing else. A predicted speed-up = naive lower bound / Triton "serial" estimate, so it
  understates the naive side; it is a prediction, not a measurement.
Rows are appended to benchmarks/results/sass_model.csv with the commit and date.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import shlex
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_kernels import D, H, SHAPES, V, draw_lengths  # noqa: E402  (the shapes and lengths it measures)
from benchutil import commit  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "sass_model.csv"
SMS, CLOCK_HZ, TENSOR_FLOP_PER_CLK, SMEM_BYTES_PER_CLK, HBM_BYTES_S = 132, 1.83e9, 4096, 128, 3.35e12

# cycles per warp instruction on one sub-partition, by unit (see the module docstring)
FP32 = {"FFMA", "FADD", "FMUL", "HFMA2", "HADD2", "HMUL2"}
IMAD = {"IMAD", "IMUL"}
ALU = {"LOP3", "LOP", "IADD3", "IADD", "ISETP", "ISCADD", "LEA", "SHF", "SHL", "SHR", "SEL", "FSEL", "FSETP",
       "FMNMX", "IMNMX", "VIADD", "VIMNMX", "PRMT", "PLOP3", "P2R", "R2P", "MOV", "I2FP", "F2FP", "IABS", "CS2R",
       "BMSK", "SGXT", "HSETP2", "HMNMX2"}
XU = {"MUFU", "I2F", "F2I", "F2F", "FRND", "POPC", "FLO", "BREV"}
SHFL = {"SHFL"}
TENSOR = {"HGMMA", "HMMA"}


def classify(op: str) -> str:
    base = op.split(".")[0]
    for name, group in (("fp32", FP32), ("imad", IMAD), ("alu", ALU), ("xu", XU), ("shfl", SHFL),
                        ("tensor", TENSOR)):
        if base in group:
            return name
    return "other"  # uniform datapath, memory, control: issue only


def loop_cycles(counts: Counter, warps: int) -> float:
    """Cycles of one iteration of a loop whose per-warp instruction counts by unit are `counts`."""
    per_subpartition = max(
        sum(counts.values()),  # issue
        counts["fp32"] + 2 * counts["imad"],  # FMA pipe
        2 * counts["alu"],
        8 * counts["xu"],
        4 * counts["shfl"],
    )
    return per_subpartition * max(1, warps / 4)


def tensor_cycles(flops: float, smem_bytes: float) -> float:
    return max(flops / TENSOR_FLOP_PER_CLK, smem_bytes / SMEM_BYTES_PER_CLK)


def profile(c) -> dict:
    """Per loop of a compiled kernel (outermost first): instruction counts by unit, per warp."""
    from dupmae.kernels import aot

    code = aot.sass(c.cubin)
    found = sorted(aot.loops(code), key=lambda se: se[0] - se[1])  # longest first
    out = []
    for s, e in found:
        body = [op for op, _ in code[s:e + 1] if op != "LABEL"]
        out.append({"span": (s, e), "n": len(body), "units": Counter(classify(op) for op in body),
                    "ops": Counter(op.split(".")[0] for op in body)})
    return {"loops": out, "total": sum(1 for op, _ in code if op != "LABEL")}


def dot_smem(m: int, n: int, k: int, warpgroups: int) -> int:
    """Bytes of shared memory a 16-bit (m x k) @ (k x n) dot reads, its m rows split over the warpgroups."""
    return 2 * (m * k + warpgroups * k * n)


def _blocks(c) -> dict:
    return {k: int(v) for k, v in c.constexprs.items() if k.startswith("BLOCK_")}


def kernel_rows(compiled, shape: dict, lengths: list[int]) -> list[dict]:
    """One row per modelled loop: what one iteration costs, how many the op runs, the predicted time."""
    B, L = shape["B"], shape["L"]
    rows = []
    for c in compiled:
        prof, bl, warps = profile(c), _blocks(c), c.num_warps
        if not prof["loops"]:
            continue
        outer = prof["loops"][0]
        units = Counter(outer["units"])
        name = c.kernel + ("[dropout]" if c.constexprs.get("DROPOUT") == "True" else "")
        d, wg = D // H, max(1, warps // 4)
        if c.kernel == "_bow_fwd_kernel":  # outer loop over positions, inner over features
            inner = prof["loops"][1]
            n_inner = math.ceil(D / bl["BLOCK_D"])
            step, rest = loop_cycles(inner["units"], warps), loop_cycles(units - inner["units"], warps)
            flops = 2 * bl["BLOCK_L"] * bl["BLOCK_V"] * D
            smem = n_inner * dot_smem(bl["BLOCK_V"], bl["BLOCK_L"], bl["BLOCK_D"], wg)
            scalar = step * n_inner + rest
            # the feature loop's dots are asynchronous and pipelined (num_stages): they overlap its own
            # instructions, not the max/argmax that follows them
            serial = n_inner * max(step, tensor_cycles(flops, smem) / n_inner) + rest
            iters = math.ceil(V / bl["BLOCK_V"]) * sum(math.ceil(n / bl["BLOCK_L"]) for n in lengths)
            units = units + Counter({k: v * (n_inner - 1) for k, v in inner["units"].items()})
            what = f"{bl['BLOCK_L']} positions x {bl['BLOCK_V']} words x D={D}"
        elif c.kernel.startswith("_attn_") and c.kernel != "_attn_delta_kernel":
            bm, bn = bl["BLOCK_M"], bl["BLOCK_N"]
            gemms = {"_attn_fwd_kernel": 2, "_attn_dkdv_kernel": 4, "_attn_dq_kernel": 3}[c.kernel]
            flops = gemms * 2 * bm * bn * d
            # each dot as (rows split over warpgroups, columns, reduction)
            dots = {"_attn_fwd_kernel": [(bm, bn, d), (bm, d, bn)],
                    "_attn_dkdv_kernel": [(bn, bm, d), (bn, bm, d), (bn, d, bm), (bn, d, bm)],
                    "_attn_dq_kernel": [(bm, bn, d), (bm, bn, d), (bm, d, bn)]}[c.kernel]
            smem = sum(dot_smem(*x, wg) for x in dots)
            scalar = loop_cycles(units, warps)
            if c.kernel == "_attn_dkdv_kernel":  # per key block below the length, every query block
                iters = H * sum(math.ceil(n / bn) * math.ceil(L / bm) for n in lengths)
            else:  # per query block, the key blocks up to the length
                iters = H * sum(math.ceil(L / bm) * math.ceil(n / bn) for n in lengths)
            what = f"{bm} queries x {bn} keys x d={d}, {gemms} dots"
        elif c.kernel == "_bow_dweight_kernel":  # per (word block, feature block), a loop over samples
            flops, smem, scalar = 0, 0, loop_cycles(units, warps)
            iters = math.ceil(V / bl["BLOCK_V"]) * math.ceil(D / bl["BLOCK_D"]) * B
            what = f"gather {bl['BLOCK_V']} rows x {bl['BLOCK_D']} features of one sample"
        elif c.kernel == "_bow_dhidden_kernel":  # per (position, feature block), the words whose max is there
            flops, smem, scalar = 0, 0, loop_cycles(units, warps)
            per_position = B * V / sum(lengths)  # words per valid position, on average
            iters = sum(lengths) * math.ceil(D / bl["BLOCK_D"]) * math.ceil(per_position / bl["BLOCK_N"])
            what = f"gather {bl['BLOCK_N']} weight rows x {bl['BLOCK_D']} features"
        else:
            continue
        tensor = tensor_cycles(flops, smem)
        if c.kernel != "_bow_fwd_kernel":
            serial = scalar + tensor
        overlap = max(scalar, tensor)
        seconds = lambda cyc: iters * cyc / (SMS * CLOCK_HZ)  # noqa: E731
        rows.append({"kernel": name, "iteration": what, "warps": warps, "instructions": sum(units.values()),
                     **{u: units[u] for u in ("imad", "alu", "fp32", "xu", "shfl", "tensor", "other")},
                     "scalar_cycles": scalar, "tensor_cycles": tensor, "iterations": iters,
                     "serial_ms": seconds(serial) * 1e3, "overlap_ms": seconds(overlap) * 1e3,
                     "tensor_share_serial": tensor / serial if serial else 0.0})
    return rows


# -- naive paths: a roofline lower bound of every aten op ---------------------------------------------------

def naive_lower_bound_ms(op: str, shape: dict, lengths: list[int]) -> float:
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from dupmae.kernels import philox

    aten = torch.ops.aten
    matmuls = {aten.mm.default: lambda a, b: 2 * a.shape[0] * a.shape[1] * b.shape[1],
               aten.bmm.default: lambda a, b: 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]}

    def nbytes(t) -> int:
        return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())

    class Roofline(TorchDispatchMode):
        seconds = 0.0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._schema.name.split("::")[-1] in {"view", "_unsafe_view", "expand", "t", "transpose",
                                                     "unsqueeze", "squeeze", "slice", "select", "alias",
                                                     "detach", "permute", "as_strided", "reshape"}:
                return out  # no data moves
            tensors = [x for x in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(x, torch.Tensor)]
            moved = sum(nbytes(x) for x in tensors) / HBM_BYTES_S
            flops = matmuls[func](*args[:2]) if func in matmuls else 0
            Roofline.seconds += max(moved, flops / (SMS * TENSOR_FLOP_PER_CLK * CLOCK_HZ))
            return out

    B, L = shape["B"], shape["L"]
    meta = torch.device("meta")
    lengths_t = torch.tensor(lengths)
    with Roofline():
        if op == "bow_max_pool":
            h = torch.empty(B, L, D, dtype=torch.bfloat16, device=meta, requires_grad=True)
            w = torch.empty(V, D, dtype=torch.bfloat16, device=meta, requires_grad=True)
            b = torch.empty(V, dtype=torch.bfloat16, device=meta, requires_grad=True)
            valid = torch.empty(B, L, dtype=torch.bool, device=meta)
            logits = torch.matmul(h, w.t()) + b
            mu = logits.masked_fill(~valid[:, :, None], float("-inf")).max(dim=1).values
            torch.autograd.grad(mu, (h, w, b), torch.empty_like(mu))
            return Roofline.seconds * 1e3
        seeds = torch.empty(B, dtype=torch.int64, device=meta)
        words = torch.empty(B, L, dtype=torch.int32, device=meta)
        philox.decoder_visibility(seeds, words, lengths_t.to(meta), 0.5)
    d = D // H
    sdpa_flops = 14 * B * H * L * L * d  # forward 2 dots, backward 5 (recomputing the scores)
    return (Roofline.seconds + sdpa_flops / (SMS * TENSOR_FLOP_PER_CLK * CLOCK_HZ)) * 1e3


def lengths_of(shape: dict) -> list[int]:
    """The lengths bench_kernels.py draws for this shape."""
    import torch

    return draw_lengths(shape["B"], shape["L"], torch.Generator().manual_seed(0)).tolist()


FIELDS = ["date", "commit", "arch", "shape", "kernel", "iteration", "warps", "instructions", "imad", "alu", "fp32",
          "xu", "shfl", "tensor", "other", "scalar_cycles", "tensor_cycles", "iterations", "serial_ms",
          "overlap_ms", "tensor_share_serial", "naive_lower_ms", "speedup_lower", "command"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=tuple(SHAPES), action="append")
    ap.add_argument("--out-csv", type=Path, default=RESULTS)
    args = ap.parse_args()
    import torch

    from dupmae.kernels import aot

    stamp = (dt.date.today().isoformat(), commit())
    command = "python benchmarks/sass_model.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    all_rows = []
    for shape_name in args.shape or tuple(SHAPES):
        shape = SHAPES[shape_name]
        lengths = lengths_of(shape)
        calls = aot.model_calls(torch.bfloat16, B=2, L=shape["L"])  # the code is per L, not B
        compiled = list(aot.compile_launches(aot.record_launches(calls), 90))
        rows = kernel_rows(compiled, shape, lengths)
        print(f"\n{shape_name} (B={shape['B']}, L={shape['L']}, D={D}, H={H}, V={V}), sm_90 bf16, per iteration "
              "of each kernel's main loop (instructions per warp):")
        print(f"  {'kernel':26} {'warps':>5} {'instr':>6} {'imad':>5} {'alu':>5} {'fp32':>5} {'xu':>4} "
              f"{'shfl':>4} {'scalar cyc':>10} {'tensor cyc':>10} {'serial ms':>9} {'overlap ms':>10} tensor share")
        for r in rows:
            print(f"  {r['kernel']:26} {r['warps']:5} {r['instructions']:6} {r['imad']:5} {r['alu']:5} {r['fp32']:5} "
                  f"{r['xu']:4} {r['shfl']:4} {r['scalar_cycles']:10.0f} {r['tensor_cycles']:10.0f} "
                  f"{r['serial_ms']:9.3f} {r['overlap_ms']:10.3f} {100 * r['tensor_share_serial']:5.0f}%")
            all_rows.append({"arch": 90, "shape": shape_name, **r})
        ms = {r["kernel"]: r for r in rows}
        bow_fwd = ms["_bow_fwd_kernel"]["serial_ms"]
        bow = bow_fwd + ms["_bow_dweight_kernel"]["serial_ms"] + ms["_bow_dhidden_kernel"]["serial_ms"]
        attn_fwd = ms["_attn_fwd_kernel"]["serial_ms"]
        attn = attn_fwd + ms["_attn_dkdv_kernel"]["serial_ms"] + ms["_attn_dq_kernel"]["serial_ms"]
        drop = sum(ms[f"_attn_{k}_kernel[dropout]"]["serial_ms"] for k in ("fwd", "dkdv", "dq"))
        flops = 2 * shape["B"] * shape["L"] * V * D
        print(f"  bow_max_pool forward: {bow_fwd:.3f} ms, {flops / (bow_fwd * 1e-3) / 1e12:.0f} TFLOP/s = "
              f"{100 * flops / (bow_fwd * 1e-3) / (SMS * TENSOR_FLOP_PER_CLK * CLOCK_HZ):.0f}% of the bf16 peak")
        for op, ours, goal in (("bow_max_pool", bow, 1.5), ("decoder_attention", attn, 3.0)):
            naive = naive_lower_bound_ms(op, shape, lengths)
            verdict = "predicted to meet" if naive / ours >= goal else "AT RISK for"
            print(f"  {op:18} fwd+bwd: Triton {ours:.3f} ms (serial model) vs naive >= {naive:.3f} ms (roofline): "
                  f">= {naive / ours:.1f}x, {verdict} the {goal}x goal")
            all_rows.append({"arch": 90, "shape": shape_name, "kernel": f"{op} fwd+bwd", "serial_ms": ours,
                             "naive_lower_ms": naive, "speedup_lower": naive / ours})
        print(f"  decoder_attention fwd+bwd with attention dropout 0.1 (as in training; the naive path has none): "
              f"{drop:.3f} ms")
        all_rows.append({"arch": 90, "shape": shape_name, "kernel": "decoder_attention[dropout] fwd+bwd",
                         "serial_ms": drop})
    new = not args.out_csv.exists()
    with open(args.out_csv, "a", newline="") as f:
        w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in all_rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in
                        dict(r, date=stamp[0], commit=stamp[1], command=command).items()})


if __name__ == "__main__":
    main()
