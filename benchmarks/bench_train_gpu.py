"""A whole pre-training step at BERT-base scale on one GPU: `dupmae pretrain` with the Triton kernels, with
`model.kernels = "reference"`, and with the NAIVE model (full B x L x V logits, explicit B x L x L masks: the
reference code's way), each in a fresh process (../shared/gpu-checklist.md item 3).

    python benchmarks/bench_train_gpu.py                       # appends to benchmarks/results/train_gpu.csv
    python benchmarks/bench_train_gpu.py --tokenizer DIR --steps 30 --micro-batch 32

Model: BERT-base (12 layers x 768, 12 heads, V = 30,522) from random weights, bf16 (DeepSpeed bf16, fp32
master weights), ZeRO stage 1 on one rank, torch AdamW. Data: the embedded WordNet corpus packed to L = 512 by
`dupmae prepare` (its tokenizer: --tokenizer, default the packaged one). Tokens/s, MFU and peak memory are the
trainer's own console figures (engine/metrics.py: analytic FLOPs of the useful work, the same for all three, over
the device's dense bf16 peak); the reported value is the median over the logging windows after the first
(which holds Triton's autotuning and CUDA's warm-up). Goals: the kernels >= 2x the naive tokens/s, >= 45% MFU.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train_gpu.csv"
WORK = ROOT / "work" / "bench-train-gpu"
IMPLS = ("triton", "reference", "naive")
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512)
LINE = re.compile(r"step (\d+)/\d+ \| .*?\| ([\d,]+) tok/s .*?\| MFU ([\d.]+)% \| .*?\| mem ([\d.]+) GiB")


def _recipe(impl: str, shards: Path, steps: int, micro_batch: int, zero: int = 1) -> Path:
    cfg = f"""
[model]
encoder_config = {{ {", ".join(f"{k} = {v}" for k, v in BERT_BASE.items())} }}
kernels = "{"reference" if impl == "naive" else impl}"

[data]
shards = ["{shards}"]
micro_batch = {micro_batch}
grad_accum = 1
eval_samples = 64
num_workers = 2

[train]
run_dir = "{WORK / "runs" / f"{impl}-zero{zero}"}"
max_steps = {steps}
precision = "bf16"
eval_every = 1000000

[optim]
lr = 1e-4
warmup = 0.1

[zero]
stage = {zero}

[checkpoint]
every = 1000000
keep_last = 1

[logging]
every = 5
"""
    path = WORK / f"{impl}-zero{zero}.toml"
    path.write_text(cfg)
    return path


def _profile_trainer_steps(out: Path) -> None:
    """torch.profiler over three whole trainer steps (after 15 + 2 warm-up ones): a table of the top operators
    by host time and by device time in `out`, to see what the trainer adds to the model's own step."""
    import deepspeed
    import torch

    def ready(prof):
        avg = prof.key_averages()
        out.write_text(avg.table(sort_by="cpu_time_total", row_limit=30) + "\n\n"
                       + avg.table(sort_by="cuda_time_total", row_limit=30))

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                              torch.profiler.ProfilerActivity.CUDA],
                                  schedule=torch.profiler.schedule(wait=15, warmup=2, active=3, repeat=1),
                                  on_trace_ready=ready)
    prof.start()
    step = deepspeed.DeepSpeedEngine.step

    def profiled_step(self, *a, **k):
        r = step(self, *a, **k)
        prof.step()  # grad_accum is 1 here: one engine step per trainer step
        return r

    deepspeed.DeepSpeedEngine.step = profiled_step


def child(impl: str, recipe: str) -> int:
    """In this process: one `dupmae pretrain` run (the naive model through a task that swaps the model)."""
    from dupmae.engine.config import load_config
    from dupmae.engine.pretrain import PretrainTask
    from dupmae.engine.trainer import run

    cfg = load_config(recipe, [])
    if os.environ.get("BENCH_PROFILE_TRAINER"):
        _profile_trainer_steps(Path(os.environ["BENCH_PROFILE_TRAINER"]))
    if impl != "naive":
        return run(cfg, PretrainTask(cfg))

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from naive_dupmae import naive_losses

    from dupmae.engine.model import DupMAEOutput

    class Naive(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.config = model.config

        def forward(self, batch, denominators=None, with_accuracy=False):
            parts = naive_losses(self.model, batch)
            return DupMAEOutput(parts["total"], parts["mlm"], parts["dec"], parts["bow"],
                                int((batch["labels"] != -100).sum()), int((batch["decoder_labels"] != -100).sum()))

    class NaiveTask(PretrainTask):
        def build_model(self):
            return Naive(super().build_model())

        @staticmethod
        def external_parameters(model):
            return PretrainTask.external_parameters(model.model)

    return run(cfg, NaiveTask(cfg))


def profile(impl: str, recipe: str) -> None:
    """In this process: forward+backward of the model alone (bf16 weights, no optimizer, no DeepSpeed) on one
    batch of the same data, timed with CUDA synchronization, then a torch.profiler table of the top operators:
    what the trainer adds is the difference to the trainer's step."""
    import time

    import torch

    from dupmae.engine.config import load_config
    from dupmae.engine.pretrain import PretrainTask

    sys.path.insert(0, str(ROOT / "tests"))
    from naive_dupmae import naive_losses

    cfg = load_config(recipe, [])
    task = PretrainTask(cfg)
    task.setup_data(1, 0)
    model = task.build_model().cuda().to(torch.bfloat16).train()
    batch = task.collator([task.dataset[i] for i in range(cfg.data.micro_batch)])
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    tokens = int(batch["lengths"].sum())

    def step():
        model.zero_grad(set_to_none=True)
        loss = naive_losses(model, batch)["total"] if impl == "naive" else model(batch).loss
        loss.backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    secs = (time.perf_counter() - t) / 10
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    (WORK / f"profile-{impl}.txt").write_text(table)
    print(f"model only {impl:9} {secs * 1e3:8.1f} ms fwd+bwd  {tokens / secs:>10,.0f} tok/s  "
          f"batch {tuple(batch['input_ids'].shape)}  peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for dupmae prepare (default: packaged)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--impl", choices=IMPLS, action="append")
    ap.add_argument("--zero", type=int, default=1, help="ZeRO stage (default 1)")
    ap.add_argument("--profile-trainer", action="store_true",
                    help="torch.profiler tables of three whole trainer steps per impl (work/bench-train-gpu/)")
    ap.add_argument("--profile", action="store_true", help="also time the model alone and profile it per impl")
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "RECIPE"), help=argparse.SUPPRESS)
    ap.add_argument("--profile-child", nargs=2, metavar=("IMPL", "RECIPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.exit(child(*args.child))
    if args.profile_child:
        profile(*args.profile_child)
        return

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_train_gpu needs a CUDA GPU")
    device = torch.cuda.get_device_name()
    WORK.mkdir(parents=True, exist_ok=True)
    shards = WORK / "shards-512"
    if not (shards / "manifest.json").exists():
        # a WordNet record is ~17 tokens and a sample holds one document: join 40 consecutive records so that
        # samples fill L = 512
        text = WORK / "wordnet-blocks.jsonl"
        with open(ROOT / "data" / "wordnet" / "corpus.jsonl", encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        with open(text, "w", encoding="utf-8") as f:
            for i in range(0, len(records), 40):
                block = " ".join(f"{r['title']}: {r['text']}" for r in records[i : i + 40])
                f.write(json.dumps({"text": block}) + "\n")
        cmd = [sys.executable, "-m", "dupmae.engine.cli", "prepare", str(text),
               "--out", str(shards), "--max-len", "512", "--no-progress", "--overwrite"]
        if args.tokenizer:
            cmd += ["--tokenizer", args.tokenizer]
        subprocess.run(cmd, check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    rows = []
    for impl in args.impl or IMPLS:
        recipe = _recipe(impl, shards, args.steps, args.micro_batch, args.zero)
        shutil.rmtree(WORK / "runs" / f"{impl}-zero{args.zero}", ignore_errors=True)  # fresh, never a resume
        env = dict(os.environ, DUPMAE_KERNELS="reference" if impl != "triton" else "triton")
        if args.profile_trainer:
            env["BENCH_PROFILE_TRAINER"] = str(WORK / f"trainer-profile-{impl}-zero{args.zero}.txt")
        proc = subprocess.run([sys.executable, __file__, "--child", impl, str(recipe)], env=env,
                              capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        (WORK / f"{impl}-zero{args.zero}.log").write_text(out)
        windows = [(int(s), float(t.replace(",", "")), float(m), float(g)) for s, t, m, g in LINE.findall(out)]
        if proc.returncode != 0 or len(windows) < 2:
            print(f"{impl}: rc {proc.returncode}, {len(windows)} logging windows\n{out[-3000:]}", flush=True)
            rows.append(dict(impl=impl, tokens_s=float("nan"), mfu=float("nan"), peak_gib=float("nan"),
                             rc=proc.returncode))
            continue
        later = windows[1:]
        r = dict(impl=impl, tokens_s=statistics.median(w[1] for w in later),
                 mfu=statistics.median(w[2] for w in later), peak_gib=max(w[3] for w in windows), rc=0)
        rows.append(r)
        print(f"{impl:9} {r['tokens_s']:>10,.0f} tok/s  MFU {r['mfu']:5.1f}%  peak {r['peak_gib']:6.2f} GiB",
              flush=True)
        if args.profile:
            subprocess.run([sys.executable, __file__, "--profile-child", impl, str(recipe)], env=env)
    naive = next((r for r in rows if r["impl"] == "naive"), None)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new = not RESULTS.exists()
    with open(RESULTS, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "device", "commit", "torch", "model", "seq", "micro_batch", "dtype", "zero", "impl",
                        "tokens_per_s", "mfu_percent", "peak_gib", "x_naive_tokens_s", "note"])
        for r in rows:
            ratio = r["tokens_s"] / naive["tokens_s"] if naive and naive["tokens_s"] > 0 else float("nan")
            w.writerow([dt.date.today().isoformat(), device, commit, torch.__version__, "bert-base", 512,
                        args.micro_batch, "bf16", args.zero, r["impl"], f"{r['tokens_s']:.0f}", f"{r['mfu']:.1f}",
                        f"{r['peak_gib']:.2f}", f"{ratio:.2f}", ""])
            print(f"{r['impl']}: {ratio:.2f}x the naive tokens/s", flush=True)


if __name__ == "__main__":
    main()
