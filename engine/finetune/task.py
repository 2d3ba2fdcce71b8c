"""`dupmae finetune`: the fine-tuning task the shared trainer runs (engine/trainer.py), and its recipe.

    dupmae finetune -c configs/finetune-wordnet-cpu.toml optim.lr=2e-5
    deepspeed --num_gpus 8 --no_local_rank $(which dupmae) finetune -c RECIPE

The three stages of the paper's retriever are recipes of this one task:
    stage 1  contrastive, in-batch + cross-rank negatives (data: BEIR qrels, or jsonl with given negatives)
    stage 2  the same on negatives mined by `dupmae mine` (from the pre-trained model or from stage 1)
    stage 3  model.distill_weight > 0 on data carrying teacher scores (pos_scores / neg_scores)
Everything a pre-training run has, a fine-tuning run has (it is the same loop): ZeRO 0-3 and offload,
fp32/bf16, gradient accumulation, exact resume, SIGTERM/USR1 save-and-exit 75, the run directory,
TensorBoard, metrics.jsonl, `dupmae launch` and the batch scripts. Every `train.eval_every` steps the model
is evaluated on `data.dev` (a BEIR folder): NDCG@10 and Recall@100 go to TensorBoard and metrics.jsonl.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import distributed
from ..model import tied_head_parameters
from ..config import (CheckpointConfig, ConfigError, LoggingConfig, OptimConfig, TrainConfig, ZeroConfig,
                      load_config, validate_common)
from .model import STATS, RetrieverConfig, RetrieverTraining, grad_cache_passes, grad_cache_plan


@dataclass
class PairDataConfig:
    """[data] of a fine-tuning recipe."""

    train: list[str] = field(default_factory=list)  # BEIR folders, FlagEmbedding or Tevatron jsonl files
    format: str = "auto"  # auto | beir | flag | tevatron
    split: str = "train"  # the qrels split of a BEIR folder
    strict: bool = False  # stop at the first bad line instead of skipping it
    group_size: int = 8  # passages per query: its positive + group_size - 1 negatives
    query_max_len: int = 64
    passage_max_len: int = 256
    seed: int = 1234  # data order and every group are functions of (seed, epoch, index)
    micro_batch: int = 8  # queries per rank and micro step
    grad_accum: int = 1
    num_workers: int = 1
    pad_to_multiple_of: int = 8
    dev: str | None = None  # a BEIR folder evaluated every train.eval_every steps
    dev_split: str = "test"
    dev_max_queries: int = 0  # 0: all; else a seeded sample (every judged document kept)
    dev_max_documents: int = 0


@dataclass
class FinetuneConfig:
    model: RetrieverConfig = field(default_factory=RetrieverConfig)
    data: PairDataConfig = field(default_factory=PairDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        try:
            self.model.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not self.data.train:
            raise ConfigError("data.train: give the training data (a BEIR folder or jsonl files)")
        if self.data.format not in ("auto", "beir", "flag", "tevatron"):
            raise ConfigError(f"data.format must be auto, beir, flag or tevatron, got {self.data.format!r}")
        if self.data.group_size < 1:
            raise ConfigError("data.group_size must be >= 1")
        if self.data.query_max_len < 2 or self.data.passage_max_len < 2:
            raise ConfigError("data.query_max_len and data.passage_max_len must be >= 2")
        validate_common(self)

    def digest(self) -> str:
        """What must not change across a resume: the model and the data stream (not the batch split)."""
        keep = {"model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data)}
        for key in ("num_workers", "micro_batch", "grad_accum", "dev", "dev_split", "dev_max_queries",
                    "dev_max_documents"):
            keep["data"].pop(key)
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def load_finetune_config(path, overrides=()) -> FinetuneConfig:
    return load_config(path, overrides, cls=FinetuneConfig)


def build_retriever(cfg: RetrieverConfig):
    """The Retriever of `cfg.encoder`: the MLM model (head included; a folder without one gets a fresh head),
    and W_cls restored from a fine-tuned export (stage 2 from stage 1) or initialized (engine/representation)."""
    from ..model import ModelConfig, load_masked_lm
    from ..representation import Retriever, load_projection
    from dupmae.data_pipeline.tokenizer import resolve_tokenizer_path

    lm = load_masked_lm(ModelConfig(encoder=cfg.encoder))
    retriever = Retriever(lm, cfg.dense_dim, cfg.pooling, cfg.normalize, cfg.kernels, cfg.bow_encoder_grad)
    folder = resolve_tokenizer_path(cfg.encoder)
    if load_projection(folder, retriever) and retriever.dense_dim != (cfg.dense_dim or lm.config.hidden_size):
        raise ConfigError(f"{folder} holds a W_cls of {retriever.dense_dim} dimensions; model.dense_dim is "
                          f"{cfg.dense_dim}")
    return retriever


def new_head_hint(m: RetrieverConfig, fresh_head: bool) -> str | None:
    """A note for a hybrid or BoW run whose encoder came without an MLM head and whose recipe trains that new head
    like a pre-trained one (the joint defaults): measured on SciFact, such a head stays undertrained and its
    gradient costs the dense part (benchmarks/README.md, "Fine-tuning on SciFact")."""
    if not fresh_head or m.mode == "dense" or m.bow_head_lr_scale != 1.0:
        return None
    return ("[finetune] note: model.encoder has no MLM head, so the BoW part starts from a new one. For a new head "
            "on a sentence encoder, training the parts apart with the head at a higher learning rate did best on "
            "SciFact (hybrid 0.793 against 0.766 with these defaults): model.hybrid_loss_weight=0 "
            "model.bow_encoder_grad=0 model.bow_head_lr_scale=20, as in configs/finetune-scifact-minilm.toml")


class FinetuneTask:
    name = "finetune"

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.part_names = cfg.model.part_names()
        self.console_parts = self.part_names
        self._dev = None

    @staticmethod
    def tensorboard_tag(part: str) -> str:
        return f"bow/{part[4:]}" if part in STATS else f"loss/{part}"

    def setup_data(self, world: int, rank: int) -> None:
        from dupmae.data_pipeline.sampler import GlobalBatchSampler
        from dupmae.data_pipeline.tokenizer import resolve_tokenizer_path

        from .data import FinetuneDataError, GroupDataset, PairCollator, load_training_data

        cfg = self.cfg
        self.world, self.rank = world, rank
        log = (lambda m: print(m, flush=True, file=sys.stderr)) if rank == 0 else (lambda m: None)
        try:
            data = load_training_data(cfg.data.train if len(cfg.data.train) > 1 else cfg.data.train[0],
                                      fmt=cfg.data.format, split=cfg.data.split, strict=cfg.data.strict, log=log)
            self.dataset = GroupDataset(data, cfg.data.group_size, cfg.data.seed)
        except FinetuneDataError as e:
            raise ConfigError(str(e)) from None
        if cfg.model.distill_weight > 0 and data.pos_scores is None:
            raise ConfigError("model.distill_weight > 0 needs teacher scores (pos_scores / neg_scores) in the data")
        self.sampler = GlobalBatchSampler(len(self.dataset), cfg.data.micro_batch, cfg.data.grad_accum, world, rank,
                                          cfg.data.seed, tag_epoch=True)
        self.tokenizer_path = str(resolve_tokenizer_path(cfg.model.encoder))
        self.collator = PairCollator(self.tokenizer_path, cfg.data.query_max_len, cfg.data.passage_max_len,
                                     cfg.data.pad_to_multiple_of or 1)

    def build_model(self) -> RetrieverTraining:
        model = RetrieverTraining(build_retriever(self.cfg.model), self.cfg.model)
        self.model_config = model.config
        m = self.cfg.model
        if self.rank == 0 and (hint := new_head_hint(m, getattr(model.lm, "dupmae_fresh_head", False))):
            print(hint, file=sys.stderr, flush=True)
        if m.mode != "dense" and m.bow_weight == 0:
            # the same texts on every rank, whatever the split of the global batch (its first 64 queries at most)
            # and the starting weights: a function of the recipe, so a resumed run computes it again identically
            first = self.sampler.global_batch_ids(0)[:64]
            batch = self.collator([self.dataset[int(i)] for i in first])
            m.bow_weight = model.calibrate_bow_weight(batch)
            if self.rank == 0:
                print(f"[finetune] model.bow_weight calibrated to {m.bow_weight:g} (std of dense / std of BoW scores "
                      "on the first batch; set it in the recipe to fix it)", file=sys.stderr, flush=True)
        return model

    def lr_scale(self, name: str) -> float:
        """model.bow_head_lr_scale for the MLM head's transform and bias (new weights when the encoder came
        without an MLM head), 1 for every other parameter (the tied word embeddings included)."""
        head = ".cls.predictions.transform." in f".{name}" or name.endswith("cls.predictions.bias")
        return self.cfg.model.bow_head_lr_scale if head else 1.0

    @staticmethod
    def external_parameters(model: RetrieverTraining) -> list:
        return tied_head_parameters(model.lm)

    def batch_counts(self, b: dict) -> dict[str, float]:
        from ..metrics import encoder_flops

        bow = self.cfg.model.mode != "dense"
        flops = (encoder_flops(self.model_config, tuple(b["q_input_ids"].shape), bow)
                 + encoder_flops(self.model_config, tuple(b["p_input_ids"].shape), bow))
        tokens = int(b["q_attention_mask"].sum()) + int(b["p_attention_mask"].sum())
        n = len(b["q_input_ids"])
        return {"queries": n, "samples": n, "tokens": tokens, "flops": flops}

    @property
    def passes_per_micro(self) -> int:
        """Backward passes per micro batch: 1, or one per chunk with gradient caching (fixed by the recipe,
        because DeepSpeed's accumulation counts them)."""
        chunk = self.cfg.train.grad_cache_chunk
        if not chunk:
            return 1
        return len(grad_cache_plan(self.cfg.data.micro_batch, self.cfg.data.group_size, chunk))

    def passes(self, engine, batch: dict, glob: dict, scale: float):
        denominators = {"queries": glob["queries"] / scale}
        if self.cfg.train.grad_cache_chunk:
            yield from grad_cache_passes(engine, batch, denominators, self.cfg.train.grad_cache_chunk)
            return
        out = engine(batch, denominators=denominators)
        yield out.loss, out.parts

    # -- periodic evaluation on the dev split -------------------------------------------------------

    def _dev_data(self):
        if self._dev is None:
            from ..evaluate import load_beir, subsample

            d = self.cfg.data
            data = load_beir(d.dev, d.dev_split)
            if d.dev_max_queries or d.dev_max_documents:
                data = subsample(data, d.dev_max_queries or None, d.dev_max_documents or None)
            self._dev = data
        return self._dev

    def _encode(self, trainer, texts: list[str], kind: str):
        """Every rank encodes the same number of batches (its share, by token length; ZeRO-3 needs every rank
        in every forward), then the shares are gathered into one `Encoded` in the input order."""
        from ..encoder import Encoded
        from ..representation import document_top_k

        if getattr(self, "_tokenizer", None) is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)
        tok = self._tokenizer
        max_len = self.cfg.data.query_max_len if kind == "query" else self.cfg.data.passage_max_len
        ids = tok(texts, truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"]
        order = np.argsort([-len(x) for x in ids], kind="stable")
        mine = order[self.rank :: self.world]
        bs = self.cfg.data.micro_batch * max(self.cfg.data.group_size, 1)
        n_batches = -(-len(order[0 :: self.world]) // bs)
        k = self.cfg.model.bow_top_k if kind == "document" else 0
        dense, mus = [], []
        for i in range(n_batches):
            rows = mine[i * bs : (i + 1) * bs]
            rows = rows if len(rows) else order[:1]  # a rank out of texts still joins the forward
            batch = tok.pad({"input_ids": [ids[j] for j in rows]}, return_tensors="pt")
            rep = trainer.engine(trainer._to_device({"input_ids": batch["input_ids"],
                                                     "attention_mask": batch["attention_mask"]}), encode=kind)
            if len(mine[i * bs : (i + 1) * bs]):
                dense.append(rep.dense.float().cpu() if rep.dense is not None else None)
                mus.append(rep.mu.float().cpu() if rep.mu is not None else None)
        local = {"rows": torch.as_tensor(mine, dtype=torch.long)}
        if dense and dense[0] is not None:
            local["dense"] = torch.cat(dense)
        if mus and mus[0] is not None:
            mu = torch.cat(mus)
            values, kept = document_top_k(mu, k) if k else (mu, None)
            local["values"], local["ids"] = values, kept
        parts = distributed.gather_objects(local)
        n = len(texts)
        rows = torch.cat([p["rows"] for p in parts])
        d = (torch.zeros(n, parts[0]["dense"].shape[1]) if "dense" in parts[0] else torch.zeros(n, 0))
        if "dense" in parts[0]:
            d[rows] = torch.cat([p["dense"] for p in parts])
        vocab = int(self.model_config.vocab_size)
        if "values" in parts[0]:
            values = torch.zeros(n, parts[0]["values"].shape[1])
            values[rows] = torch.cat([p["values"] for p in parts])
            if parts[0]["ids"] is not None and k:
                kept = torch.zeros(n, k, dtype=torch.int32)
                kept[rows] = torch.cat([p["ids"] for p in parts]).to(torch.int32)
                bow_ids = kept.numpy()
            else:
                bow_ids = np.zeros((n, 0), np.int32)
            bow_values = values.numpy()
        else:
            bow_ids, bow_values = np.zeros((n, 0), np.int32), np.zeros((n, 0), np.float32)
        return Encoded(d.numpy(), bow_ids, bow_values, vocab, {"kind": kind})

    def evaluate(self, trainer) -> tuple[dict, str]:
        if not self.cfg.data.dev:
            return {}, ""
        from ..evaluate import metrics, run_from_ranking
        from ..retrieval import search

        data = self._dev_data()
        docs = self._encode(trainer, data.corpus_texts, "document")
        queries = self._encode(trainer, data.query_texts, "query")
        m = self.cfg.model
        scores, idx = search(queries, docs, m.mode, k=100, bow_weight=m.bow_weight)
        row = metrics(data.qrels, run_from_ranking(data, scores, idx))
        result = {f"eval/{k.replace('@', '_at_')}": v for k, v in row.items()}
        line = (f"{m.mode} on {Path(self.cfg.data.dev).name}/{self.cfg.data.dev_split} ({len(data.query_ids)} queries, "
                f"{len(data.corpus_ids):,} documents): " + " ".join(f"{k} {v:.4f}" for k, v in row.items()))
        return result, line


def run(cfg: FinetuneConfig) -> int:
    from ..trainer import run as run_trainer

    return run_trainer(cfg, FinetuneTask(cfg))
