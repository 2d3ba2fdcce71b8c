"""The pre-training task the shared trainer runs (`dupmae pretrain`): DupMAE on packed shards.

What it tells the trainer (engine/trainer.py): the model (`DupMAE`, its tied MLM-head weights registered for
ZeRO-3), the data (packed shards, the global-batch sampler, the DupMAE collator; the last `data.eval_samples`
samples held out), the counts of a batch (masked tokens, decoder tokens, samples, tokens, analytic FLOPs), the
loss of a micro batch normalized by the global batch's counts, and the held-out evaluation.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import distributed
from .config import ConfigError, RunConfig
from .metrics import step_flops
from .model import DupMAE, tied_head_parameters


class PretrainTask:
    name = "pretrain"
    part_names = ("loss", "mlm", "dec", "bow")
    console_parts = ("mlm", "dec", "bow")

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        # the objective's own losses only: an "mlm" run logs no decoder or BoW loss
        keep = {"dupmae": ("mlm", "dec", "bow"), "retromae": ("mlm", "dec"), "mlm": ("mlm",)}[cfg.model.objective]
        self.part_names = ("loss", *keep)
        self.console_parts = keep

    @staticmethod
    def tensorboard_tag(part: str) -> str:
        return f"loss/{part}"

    def setup_data(self, world: int, rank: int) -> None:
        from dupmae.data_pipeline.collator import DupMAECollator
        from dupmae.data_pipeline.dataset import EpochSamples, open_datasets
        from dupmae.data_pipeline.sampler import GlobalBatchSampler
        from dupmae.data_pipeline.tokenizer import tokenizer_info

        cfg = self.cfg
        self.world, self.rank = world, rank
        self.corpus = open_datasets(cfg.data.shards, cfg.data.weights)
        self.info = tokenizer_info(str(Path(cfg.data.shards[0]) / "tokenizer"))
        n = len(self.corpus)
        self.n_train = n - cfg.data.eval_samples  # the last eval_samples ids are held out
        if self.n_train < 1:
            raise ConfigError(f"data.eval_samples {cfg.data.eval_samples} leaves no training sample of {n}")
        # the sampler tags each id with its epoch and the dataset hands the epoch to the collator: a sample's
        # masks are new every epoch, a function of (seed, epoch, id)
        self.dataset = EpochSamples(self.corpus, self.n_train)
        self.sampler = GlobalBatchSampler(self.n_train, cfg.data.micro_batch, cfg.data.grad_accum, world, rank,
                                          cfg.data.seed, tag_epoch=True)
        self.collator = DupMAECollator(self.info, seed=cfg.data.seed, max_len=self.dataset.max_len,
                                       encoder_mask_prob=cfg.data.encoder_mask_prob,
                                       pad_to_multiple_of=cfg.data.pad_to_multiple_of or None)

    def build_model(self) -> DupMAE:
        model = DupMAE.from_config(self.cfg.model)
        if model.config.vocab_size < self.info.vocab_size:
            raise ConfigError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the shards' "
                              f"tokenizer ({self.info.vocab_size}): prepare the data with the model's tokenizer")
        if self.dataset.max_len > model.config.max_position_embeddings:
            raise ConfigError(f"shards hold samples of {self.dataset.max_len} positions; the model has "
                              f"{model.config.max_position_embeddings}")
        self.model_config = model.config
        return model

    @staticmethod
    def external_parameters(model: DupMAE) -> list:
        return tied_head_parameters(model.lm)

    def batch_counts(self, b: dict) -> dict[str, float]:
        mlm, dec = int((b["labels"] != -100).sum()), int((b["decoder_labels"] != -100).sum())
        return {"mlm": mlm, "dec": dec, "samples": len(b["lengths"]), "tokens": int(b["lengths"].sum()),
                "flops": step_flops(self.model_config, tuple(b["input_ids"].shape), mlm, dec,
                                    self.cfg.model.objective)}

    def passes(self, engine, batch: dict, glob: dict, scale: float):
        """One backward pass per micro batch: (loss, its parts)."""
        denominators = {"mlm": glob["mlm"] / scale, "dec": glob["dec"] / scale, "samples": glob["samples"] / scale}
        out = engine(batch, denominators=denominators)
        # tensors, read by the trainer after the backward pass is queued (no host synchronization here)
        every = {"loss": out.loss, "mlm": out.mlm_loss, "dec": out.dec_loss, "bow": out.bow_loss}
        yield out.loss, {k: every[k].detach() for k in self.part_names}

    def evaluate(self, trainer) -> tuple[dict, str]:
        """The objective's losses and MLM accuracy on the held-out samples (this rank's share, then averaged)."""
        cfg = self.cfg
        n_eval = min(cfg.data.eval_samples, cfg.train.eval_batches * cfg.data.micro_batch * self.world)
        if n_eval < self.world:
            return {}, ""
        ids = list(range(self.n_train, self.n_train + n_eval))[self.rank :: self.world]
        sums = torch.zeros(6, dtype=torch.float64)
        for i in range(0, len(ids), cfg.data.micro_batch):
            chunk = ids[i : i + cfg.data.micro_batch]
            # untagged ids: epoch 0's masks, the same at every evaluation
            batch = trainer._to_device(self.collator([self.corpus[j] for j in chunk]))
            out = trainer.engine(batch, with_accuracy=True)
            sums += torch.tensor([out.mlm_loss.item() * out.mlm_tokens, out.dec_loss.item() * out.dec_tokens,
                                  out.bow_loss.item() * len(chunk), out.mlm_correct, out.mlm_tokens, out.dec_tokens],
                                 dtype=torch.float64)
        tot = distributed.all_reduce(sums.tolist() + [float(len(ids))])
        mlm, dec, bow = tot[0] / max(tot[4], 1), tot[1] / max(tot[5], 1), tot[2] / max(tot[6], 1)
        losses = {k: v for k, v in (("mlm", mlm), ("dec", dec), ("bow", bow)) if k in self.part_names}
        result = {"eval/loss": mlm + dec + cfg.model.w_bow * bow} | {f"eval/{k}": v for k, v in losses.items()} | {
            "eval/mlm_accuracy": tot[3] / max(tot[4], 1)}
        detail = " ".join(f"{k} {v:.3f}" for k, v in losses.items())
        line = (f"loss {result['eval/loss']:.4f} ({detail}) | "
                f"MLM accuracy {100 * result['eval/mlm_accuracy']:.1f}% on {int(tot[6])} samples")
        return result, line
