"""Tokenization throughput and peak memory of `dupmae prepare` against the reference way and the raw tokenizer.

On the same jsonl text, one run each (--repeat N: N each, median), every run in a fresh process (so memory
peaks never mix):

    prepare            dupmae.data_pipeline.prepare.prepare(PrepareConfig(...)), max_len 512, --workers processes
    datasets.map       HF `datasets`: load_dataset("json") + Dataset.map(batched=True, num_proc=workers) with the
                       same fast tokenizer (AutoTokenizer -> BertTokenizerFast), add_special_tokens=False: the
                       reference RetroMAE/DupMAE pre-processing
    encode_batch_fast  tokenizers.Tokenizer (tok.backend_tokenizer, no truncation/padding) over batches of 1,000
                       documents already in memory: the raw ceiling (Rust threads on all cores)
    tokenizer_call     BertTokenizerFast.__call__ over the same in-memory batches, for reference

tokens/s = tokens produced / wall time of the job. The job's clock starts after the imports (transformers,
datasets, dupmae) and includes everything else: tokenizer load, reading, tokenizing, writing (prepare), the
Arrow conversion and cache writes (datasets). For the in-memory runs only the tokenizer calls are timed.
process_s is the whole process, interpreter start and imports included.
Peak memory: the process tree's summed RSS, sampled every 50 ms by psutil from outside (peak_rss_mb, the number
to use); the child's own getrusage(RUSAGE_SELF) and RUSAGE_CHILDREN ru_maxrss are printed too, with the CPU
seconds of the main process and of its children. RUSAGE_CHILDREN is the largest single child, and on Linux a
child started by fork+exec (multiprocessing "spawn") inherits its parent's high-water mark at exec, so that
column reads at least the parent's RSS at the time the workers started, not what the workers used.
Before each run the script waits (at most --max-wait seconds) for the machine to be idle, and it reports how much
of the machine's CPU other processes took during the timed job (other_cpu_pct; it also counts this script's
RSS sampler, about 1%); a run disturbed by more than 10% is run
again (--retries) and the least disturbed attempt kept.

    python benchmarks/bench_prepare.py                      # long documents (Python docs) + WordNet
    python benchmarks/bench_prepare.py --text my.jsonl      # your own jsonl ({"text": ...}, optional "title")
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchutil as bu

COLUMNS = ["date", "machine", "commit", "dataset", "method", "tokens", "seconds", "tokens_per_s", "peak_rss_mb"]
METHODS = ("prepare", "datasets.map", "encode_batch_fast", "tokenizer_call")
BATCH_DOCS = 1000
CHILD_TIMEOUT_S = 300
DISTURBED_PCT = 10.0


# ---------------------------------------------------------------------------------------------- child side

def _tokenizer_path() -> str:
    from dupmae.data_pipeline.tokenizer import resolve_tokenizer_path

    return str(resolve_tokenizer_path(None))


class JobClock:
    """Wall time of the job, and the CPU that OTHER processes of the machine used meanwhile (the machine's busy CPU
    minus this process's and its waited-for children's)."""

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), bu.busy_cpu_seconds(), _tree_cpu()

    def stop(self) -> None:
        self.seconds = time.perf_counter() - self.t0
        other = bu.busy_cpu_seconds() - self.busy0 - (_tree_cpu() - self.own0)
        self.other_cpu_pct = 100 * max(other, 0.0) / (self.seconds * (os.cpu_count() or 1))


def _tree_cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _run_prepare(text: Path, workers: int, scratch: Path, clock: JobClock) -> int:
    from transformers import AutoTokenizer  # noqa: F401  imported before the clock starts, as in the other jobs

    from dupmae.data_pipeline.prepare import PrepareConfig, prepare

    clock.start()
    manifest = prepare(PrepareConfig(inputs=[str(text)], out_dir=str(scratch / "prepared"), max_len=512,
                                     workers=workers, progress=False),
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    clock.stop()  # prepare() has joined its workers: their CPU is in RUSAGE_CHILDREN
    return manifest["tokens"]


def _run_datasets_map(text: Path, workers: int, scratch: Path, clock: JobClock) -> int:
    os.environ["HF_DATASETS_CACHE"] = str(scratch / "hf-cache")  # cold: nothing cached from an earlier run
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()  # "sequence longer than 512" warnings: nothing is truncated here
    path = _tokenizer_path()
    clock.start()
    tok = AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=True)
    ds = datasets.load_dataset("json", data_files=str(text), split="train")
    has_title = "title" in ds.column_names

    def tokenize(batch):
        texts = ([bu.document_text({"title": t, "text": x}) for t, x in zip(batch["title"], batch["text"])]
                 if has_title else batch["text"])
        return tok(texts, add_special_tokens=False, truncation=False, return_attention_mask=False,
                   return_token_type_ids=False)

    ds = ds.map(tokenize, batched=True, num_proc=workers if workers > 1 else None, remove_columns=ds.column_names)
    clock.stop()
    return pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py()


def _run_in_memory(text: Path, method: str, clock: JobClock) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_tokenizer_path(), use_fast=True, local_files_only=True)
    texts = bu.read_texts(text)
    batches = [texts[i : i + BATCH_DOCS] for i in range(0, len(texts), BATCH_DOCS)]
    tokens = 0
    if method == "encode_batch_fast":
        backend = tok.backend_tokenizer
        backend.no_truncation()
        backend.no_padding()
        clock.start()
        for batch in batches:
            tokens += sum(len(e) for e in backend.encode_batch_fast(batch, add_special_tokens=False))
    else:
        clock.start()
        for batch in batches:
            out = tok(batch, add_special_tokens=False, truncation=False, return_attention_mask=False,
                      return_token_type_ids=False)
            tokens += sum(len(ids) for ids in out["input_ids"])
    clock.stop()
    return tokens


def child(method: str, text: Path, workers: int, result: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    scratch = Path(tempfile.mkdtemp(prefix=f"bench-{method}-", dir=bu.CACHE))
    clock = JobClock()
    try:
        if method == "prepare":
            tokens = _run_prepare(text, workers, scratch, clock)
        elif method == "datasets.map":
            tokens = _run_datasets_map(text, workers, scratch, clock)
        else:
            tokens = _run_in_memory(text, method, clock)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    result.write_text(json.dumps({"tokens": int(tokens), "seconds": clock.seconds, "other_cpu_pct": clock.other_cpu_pct,
                                  "ru_self_mb": me.ru_maxrss / 1024, "ru_children_mb": kids.ru_maxrss / 1024,
                                  "cpu_main_s": me.ru_utime + me.ru_stime,
                                  "cpu_children_s": kids.ru_utime + kids.ru_stime}))


# --------------------------------------------------------------------------------------------- parent side

def measure(method: str, text: Path, workers: int, max_wait: float) -> dict:
    """Run one method in a fresh process; sample the summed RSS of its process tree meanwhile."""
    import psutil

    if max_wait > 0 and (busy := bu.wait_for_idle(max_wait)) >= DISTURBED_PCT:
        print(f"[bench_prepare] the machine is still {busy:.0f}% busy with other work: numbers will be disturbed",
              file=sys.stderr)

    result = Path(tempfile.mkstemp(prefix="bench-result-", suffix=".json", dir=bu.CACHE)[1])
    log = result.with_suffix(".log")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--text", str(text),
           "--workers", str(workers), "--result", str(result)]
    peak = 0
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            if time.perf_counter() - t0 > CHILD_TIMEOUT_S:
                for p in ps.children(recursive=True) + [ps]:
                    p.kill()
                raise SystemExit(f"{method}: over {CHILD_TIMEOUT_S} s, killed (log: {log})")
            total = 0
            try:
                for p in [ps] + ps.children(recursive=True):
                    total += p.memory_info().rss
            except psutil.Error:
                pass
            peak = max(peak, total)
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(log.read_text())
        raise SystemExit(f"{method} failed (exit {proc.returncode}); log: {log}")
    out = json.loads(result.read_text())
    result.unlink()
    log.unlink()
    out.update(peak_rss_mb=peak / 2**20, process_s=wall)
    return out


def method_label(method: str, workers: int) -> str:
    return {"prepare": f"dupmae prepare (workers={workers})",
            "datasets.map": f"datasets.map (num_proc={workers})",
            "encode_batch_fast": "tokenizers encode_batch_fast (in memory)",
            "tokenizer_call": "BertTokenizerFast.__call__ (in memory)"}[method]


def dataset_label(path: Path) -> str:
    with open(path, "rb") as f:
        docs = sum(1 for line in f if line.strip())
    return f"{path.stem} ({path.stat().st_size / 1e6:.1f} MB, {docs} docs)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", action="append", type=Path,
                    help="jsonl to use (repeatable); default: long documents (Python docs) and WordNet")
    ap.add_argument("--workers", type=int, default=0, help="prepare workers / datasets num_proc (0: all cores)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--retries", type=int, default=1,
                    help=f"run again, at most this many times, when other processes took more than {DISTURBED_PCT}%% "
                         "of the CPU during a run; the least disturbed attempt is kept (default 1)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per method (default 1); the table and ratios use the median run, the CSV gets every run")
    ap.add_argument("--out-csv", type=Path, default=bu.RESULTS / "prepare.csv")
    ap.add_argument("--max-wait", type=float, default=20.0,
                    help="before each run, wait at most this many seconds for the machine to be idle (0: never)")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    workers = args.workers or os.cpu_count() or 1
    if args.child:
        child(args.child, args.text[0], workers, args.result)
        return 0

    bu.CACHE.mkdir(parents=True, exist_ok=True)
    texts = args.text or [bu.long_docs_text(), bu.wordnet_text()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}")
    stamp = {"date": bu.today(), "machine": bu.machine(), "commit": bu.commit()}
    rows, summary, ratios = [], [], []
    for text in texts:
        label = dataset_label(text)
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for rep in range(args.repeat):  # methods interleaved, so a slow spell of the machine hits all of them
            for m in methods:
                print(f"[bench_prepare] {label}: {method_label(m, workers)} (run {rep + 1}/{args.repeat}) ...",
                      file=sys.stderr, flush=True)
                attempts = []
                for _ in range(args.retries + 1):
                    attempts.append(measure(m, text, workers, args.max_wait))
                    if attempts[-1]["other_cpu_pct"] <= DISTURBED_PCT:
                        break
                    print(f"[bench_prepare] other processes used {attempts[-1]['other_cpu_pct']:.0f}% of the machine's "
                          "CPU during this run", file=sys.stderr)
                r = min(attempts, key=lambda a: a["other_cpu_pct"])  # the least disturbed, not the fastest
                r["tokens_per_s"] = r["tokens"] / r["seconds"]
                runs[m].append(r)
                rows.append({**stamp, "dataset": label, "method": method_label(m, workers), "tokens": r["tokens"],
                             "seconds": f"{r['seconds']:.2f}", "tokens_per_s": f"{r['tokens_per_s']:.0f}",
                             "peak_rss_mb": f"{r['peak_rss_mb']:.0f}"})
        counts = {r["tokens"] for rs in runs.values() for r in rs}
        if len(counts) > 1:
            print(f"[bench_prepare] WARNING {label}: token counts differ between methods: "
                  + ", ".join(f"{m} {rs[0]['tokens']}" for m, rs in runs.items()), file=sys.stderr)
        speed = {}
        for m, rs in runs.items():
            med = sorted(rs, key=lambda r: r["tokens_per_s"])[(len(rs) - 1) // 2]  # the median run (lower middle)
            speed[m] = med["tokens_per_s"]
            summary.append({"dataset": label, "method": method_label(m, workers), "tokens": med["tokens"],
                            "seconds": f"{med['seconds']:.2f}", "tokens_per_s": f"{med['tokens_per_s']:,.0f}",
                            "range_tokens_per_s": f"{min(r['tokens_per_s'] for r in rs) / 1e6:.2f}-"
                                                  f"{max(r['tokens_per_s'] for r in rs) / 1e6:.2f}M",
                            "peak_rss_mb": f"{max(r['peak_rss_mb'] for r in rs):.0f}",
                            "ru_self_mb": f"{med['ru_self_mb']:.0f}", "ru_children_mb": f"{med['ru_children_mb']:.0f}",
                            "process_s": f"{med['process_s']:.1f}", "cpu_main_s": f"{med['cpu_main_s']:.1f}",
                            "cpu_children_s": f"{med['cpu_children_s']:.1f}",
                            "other_cpu_pct": f"{max(r['other_cpu_pct'] for r in rs):.0f}"})
        if "prepare" in speed and "datasets.map" in speed:
            x = speed["prepare"] / speed["datasets.map"]
            ratios.append((label, "prepare / datasets.map", f"{x:.2f}x", "goal >= 2x", "met" if x >= 2 else "NOT met"))
        if "prepare" in speed and "encode_batch_fast" in speed:
            x = speed["prepare"] / speed["encode_batch_fast"]
            ratios.append((label, "prepare / encode_batch_fast", f"{100 * x:.1f}%", "goal >= 80%",
                           "met" if x >= 0.8 else "NOT met"))
    bu.append_rows(args.out_csv, COLUMNS, rows)
    print(f"\nmedian of {args.repeat} run(s) per method (peak_rss_mb and other_cpu_pct: the largest seen)")
    bu.print_table(summary, ["dataset", "method", "tokens", "seconds", "tokens_per_s", "range_tokens_per_s",
                             "peak_rss_mb", "ru_self_mb", "ru_children_mb", "process_s", "cpu_main_s",
                             "cpu_children_s", "other_cpu_pct"])
    print()
    bu.print_table([dict(zip(("dataset", "ratio", "value", "goal", "result"), r)) for r in ratios],
                   ["dataset", "ratio", "value", "goal", "result"])
    print(f"\nappended {len(rows)} row(s) to {args.out_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
