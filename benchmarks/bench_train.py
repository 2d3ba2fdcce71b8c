"""Training throughput and peak memory per rank: the DeepSpeed trainer beside a naive plain-PyTorch loop.

    python benchmarks/bench_train.py            # appends to benchmarks/results/train.csv
    python benchmarks/bench_train.py --steps 8  # shorter

The demo model (configs/demo-cpu.toml: the 6-layer 384-wide MiniLM encoder, the embedded WordNet shards at
L=128, micro batch 16) trained by `dupmae pretrain` on 1 rank (no launcher, 2 torch threads) and on 2 ranks
(`deepspeed` launcher, 1 thread each), ZeRO stages 1, 2 and 3; beside one process running the NAIVE DupMAE
(tests/naive_dupmae.py: full B x L x V logits, explicit B x L x L masks) with torch AdamW on the same
batches, 2 threads. Tokens/s = real tokens ([CLS] .. [SEP], no padding) per second over the steps after
the first two (warm-up); peak memory = the highest resident set of each rank process, sampled every 0.2 s.
Goal: the trainer on one rank at least 1.3x the naive loop's tokens/s.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train.csv"
SHARDS = ROOT / "work" / "shards" / "wordnet-128"
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _watch(cmd: list[str], env: dict) -> tuple[int, dict[int, float], str]:
    """Run cmd, sampling the resident memory of every python process under it; returns (rc, peak MB per
    rank process, stderr tail)."""
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        peaks: dict[int, float] = {}
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                procs = []
            for p in procs:
                try:
                    if "pretrain" in " ".join(p.cmdline()) and "deepspeed" not in p.name():
                        peaks[p.pid] = max(peaks.get(p.pid, 0.0), p.memory_info().rss / 2**20)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            time.sleep(0.2)
        err.seek(0)
        return proc.returncode, peaks, err.read()[-3000:]


def _tokens_per_s(run_dir: Path, skip: int = 2) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens" in r][skip:]
    return sum(r["tokens"] for r in rows) / sum(r["step_s"] for r in rows)


def naive_child(steps: int) -> None:
    """In a child process: the naive loop on the demo's data; prints a JSON line."""
    import resource

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from naive_dupmae import naive_losses

    from dupmae.data_pipeline.collator import DupMAECollator
    from dupmae.data_pipeline.dataset import EpochSamples, PackedDataset
    from dupmae.data_pipeline.sampler import GlobalBatchSampler
    from dupmae.data_pipeline.tokenizer import tokenizer_info
    from dupmae.engine.config import load_config
    from dupmae.engine.model import DupMAE

    torch.set_num_threads(2)
    cfg = load_config(ROOT / "configs" / "demo-cpu.toml")
    torch.manual_seed(cfg.train.seed)
    model = DupMAE.from_config(cfg.model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    ds = PackedDataset(SHARDS)
    collate = DupMAECollator(tokenizer_info(str(SHARDS / "tokenizer")), seed=cfg.data.seed, max_len=ds.max_len)
    # the same global batches of 32 (same seed, same masks) as the trainer runs
    n_train = len(ds) - cfg.data.eval_samples
    samples = EpochSamples(ds, n_train)
    sampler = iter(GlobalBatchSampler(n_train, 2 * cfg.data.micro_batch, seed=cfg.data.seed, tag_epoch=True))
    tokens = seconds = 0.0
    for step in range(steps):
        batch = collate([samples[k] for k in next(sampler)])
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        naive_losses(model, batch)["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        if step >= 2:
            seconds += time.perf_counter() - t
            tokens += float(batch["lengths"].sum())
    print(json.dumps({"tokens_per_s": tokens / seconds,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--naive-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive_child:
        naive_child(args.steps)
        return
    if not (SHARDS / "manifest.json").is_file():
        subprocess.run([str(BIN / "dupmae"), "prepare", "data/wordnet/corpus.jsonl", "--out", str(SHARDS),
                        "--max-len", "128", "--no-progress"], check=True, cwd=ROOT)
    rows = []
    out = subprocess.run([sys.executable, __file__, "--naive-child", "--steps", str(args.steps)], capture_output=True,
                         text=True, check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="2"))
    naive = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append({"method": "naive PyTorch loop (full logits, explicit masks)", "ranks": 1,
                 "tokens_per_s": naive["tokens_per_s"], "peak_mb_per_rank": naive["peak_mb"]})
    print(f"{rows[-1]['method']:52} ranks 1  {naive['tokens_per_s']:8.1f} tok/s  peak {naive['peak_mb']:6.0f} MB",
          flush=True)
    for ranks in (1, 2):
        for stage in (1, 2, 3):
            # the global batch is 32 everywhere: 2 ranks x 16, or 1 rank x 16 x 2 accumulation steps
            r = _bench(ranks, stage, args.steps, ["data.grad_accum=2"] if ranks == 1 else [])
            rows.append(r)
            print(f"{r['method']:52} ranks {ranks}  {r['tokens_per_s']:8.1f} tok/s  "
                  f"peak {r['peak_mb_per_rank']:6.0f} MB", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    machine = f"{platform.node()} {os.cpu_count()} cpu, no GPU"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new = not RESULTS.exists()
    with open(RESULTS, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "machine", "commit", "method", "ranks", "tokens_per_s", "peak_mb_per_rank"])
        for r in rows:
            w.writerow([dt.date.today().isoformat(), machine, commit, r["method"], r["ranks"],
                        f"{r['tokens_per_s']:.1f}", f"{r['peak_mb_per_rank']:.0f}"])
    best_1 = max(r["tokens_per_s"] for r in rows if r["ranks"] == 1 and r["method"].startswith("dupmae"))
    print(f"one rank: {best_1 / naive['tokens_per_s']:.2f}x the naive loop's tokens/s (goal >= 1.3x)")


def _bench(ranks: int, stage: int, steps: int, extra: list[str]) -> dict:
    """`dupmae pretrain` on the demo recipe: tokens/s after warm-up and the peak resident MB of a rank."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    args = ["pretrain", "-c", "configs/demo-cpu.toml", f"train.run_dir={run_dir}", f"train.max_steps={steps}",
            "train.eval_every=0", f"zero.stage={stage}", f"checkpoint.every={steps + 1}",
            "logging.tensorboard=false", "data.num_workers=1", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1" if ranks > 1 else "2")
    cmd = ([str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--no_local_rank", "--master_port", str(_port()),
            str(BIN / "dupmae"), *args] if ranks > 1 else [str(BIN / "dupmae"), *args])
    rc, peaks, err = _watch(cmd, env)
    if rc != 0:
        raise RuntimeError(f"trainer run failed ({rc}):\n{err}")
    return {"method": f"dupmae pretrain, ZeRO-{stage}", "ranks": ranks, "tokens_per_s": _tokens_per_s(run_dir),
            "peak_mb_per_rank": max(peaks.values())}


if __name__ == "__main__":
    main()
