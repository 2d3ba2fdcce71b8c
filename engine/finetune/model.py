"""The fine-tuning model: the shared representation (engine/representation.py) and its training losses.

For a micro batch of Q queries, each with a group of G passages (its positive first, then G - 1 negatives),
every query is scored against every passage of the batch (in-batch negatives) and, with
`cross_rank_negatives`, against every passage of every rank: query and passage representations are
all-gathered with the local slot keeping its gradient, and every rank computes the loss of the GLOBAL micro
batch. DeepSpeed's gradient averaging then yields exactly the gradient of one process holding all ranks'
queries (Tevatron's scheme; `tests/test_finetune.py` checks 2 ranks x b against 1 process x 2b).

Losses (sums over queries, divided by the trainer's global query count; temperature tau):
    contrastive  CE(s / tau) with the positive as target, for the trained score and, in hybrid mode, for
                 each part too: s_hybrid = s_dense + bow_weight * s_bow, s_dense, s_bow (the hybrid term
                 weighted by model.hybrid_loss_weight, the parts' terms by model.part_loss_weight: 0 trains the
                 hybrid score only; hybrid_loss_weight = 0 trains each part on its own; every term is logged)
    self_kd      (model.self_distill, hybrid mode) KL(softmax(s_hybrid.detach() / tau) || softmax(s_part / tau))
                 for the dense and the BoW part: BGE-M3's unified fine-tuning
    teacher_kd   (model.distill_weight > 0, data with teacher scores) KL(softmax(t / tau_t) || softmax(s / tau))
                 over each query's own group: stage 3, distillation from any scorer
    bow_flops    (model.bow_flops_weight > 0) sum over ids of (mean over the batch's documents of the kept
                 |bow_weight * mu|)^2: SPLADE's FLOPS, which is largest for ids every document keeps
s_bow = bow_weight * sum over the document's kept ids of mu_q * mu_d: raw MLM logits make this part ~50-200x
the dense part at the start (`bow_to_dense` in the logs), so bow_weight scales it in every term it enters, and
by default (0) it is calibrated before the first step so that both parts start with the same spread (measured
on WordNet, 24 steps from the demo export: dev NDCG@10 0.021 with the paper's 1.0, 0.353 with 0.02).
Documents keep their top-k of mu inside this forward (what is trained is what is served).
model.bow_encoder_grad scales the gradient every BoW term sends into the shared encoder and the tied word
embeddings (engine/representation.scale_grad); the head's transform and bias always get all of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..representation import MODES, POOLINGS, Retriever, modes_needed, scatter_top_k


@dataclass
class RetrieverConfig:
    """[model] of a fine-tuning recipe."""

    encoder: str | None = None  # a `dupmae export` folder (pre-trained, or a fine-tuned stage), a BERT folder, a package
    dense_dim: int = 384  # d' of W_cls (no bias); 0 keeps the raw [CLS]
    pooling: str = "cls"  # "cls" (paper) or "mean"
    normalize: bool = False  # cosine instead of dot product for the dense part
    bow_top_k: int = 384  # entries of mu a document keeps (queries keep all)
    mode: str = "hybrid"  # what is trained and served: hybrid | dense | bow
    bow_weight: float = 0.0  # the BoW part's scale: s_bow = bow_weight * mu_q . mu_d, s_hybrid = s_dense + s_bow;
    # 0: calibrated at the start (std of dense / std of BoW scores on the first batch); 1: the paper's Eq. 12
    bow_flops_weight: float = 0.0  # penalty on ids every document keeps: sum_v (mean over the batch's documents of |s_bow weight|)^2
    temperature: float = 1.0  # 1: the raw dot product of the paper and the reference
    cross_rank_negatives: bool = True  # score against every rank's passages
    self_distill: bool = False  # hybrid mode: each part also learns from the detached hybrid score
    distill_weight: float = 0.0  # stage 3: weight of the KL to the data's teacher scores
    contrastive_weight: float = 1.0
    part_loss_weight: float = 1.0  # hybrid mode: weight of each part's own contrastive term (0: the hybrid score only)
    hybrid_loss_weight: float = 1.0  # hybrid mode: weight of the hybrid score's contrastive term (0: each part learns
    # only from its own term; with bow_encoder_grad = 0 the encoder then trains exactly as in dense mode)
    bow_encoder_grad: float = 1.0  # share of the BoW part's gradient that reaches the shared encoder and the tied word
    # embeddings (1: all; 0: only the MLM head's transform and bias learn from it, the encoder trains as in dense mode)
    bow_head_lr_scale: float = 1.0  # multiplier of optim.lr for the MLM head's transform and bias (a new head on an
    # encoder that came without one starts from random weights while everything else is pre-trained)
    teacher_temperature: float = 1.0
    shared_id_threshold: float = 0.9  # a document id kept by at least this share of the batch's documents is "shared"
    kernels: str = "auto"

    def validate(self) -> None:
        from dupmae import kernels

        if not self.encoder:
            raise ValueError("model.encoder: name the pre-trained model folder (a `dupmae export` folder)")
        if self.mode not in MODES:
            raise ValueError(f"model.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.kernels not in kernels.IMPLS:
            raise ValueError(f"model.kernels must be one of {', '.join(kernels.IMPLS)}, got {self.kernels!r}")
        if self.dense_dim < 0 or self.bow_top_k < 1:
            raise ValueError("model.dense_dim must be >= 0 and model.bow_top_k >= 1")
        if self.temperature <= 0 or self.teacher_temperature <= 0:
            raise ValueError("model.temperature and model.teacher_temperature must be > 0")
        if self.bow_weight < 0 or self.bow_flops_weight < 0:
            raise ValueError("model.bow_weight (0: calibrated) and model.bow_flops_weight must be >= 0")
        if self.distill_weight < 0 or self.contrastive_weight < 0 or self.distill_weight + self.contrastive_weight == 0:
            raise ValueError("model.distill_weight and model.contrastive_weight must be >= 0, not both 0")
        if not (self.part_loss_weight >= 0 and math.isfinite(self.part_loss_weight)):
            raise ValueError(f"model.part_loss_weight must be a finite number >= 0, got {self.part_loss_weight!r}")
        if not (self.hybrid_loss_weight >= 0 and math.isfinite(self.hybrid_loss_weight)):
            raise ValueError(f"model.hybrid_loss_weight must be a finite number >= 0, got {self.hybrid_loss_weight!r}")
        if (self.mode == "hybrid" and self.contrastive_weight > 0 and self.distill_weight == 0 and not self.self_distill
                and self.hybrid_loss_weight == 0 and self.part_loss_weight == 0):
            raise ValueError("model.hybrid_loss_weight and model.part_loss_weight are both 0: nothing would be trained")
        if not (self.bow_head_lr_scale > 0 and math.isfinite(self.bow_head_lr_scale)):
            raise ValueError(f"model.bow_head_lr_scale must be a finite number > 0, got {self.bow_head_lr_scale!r}")
        if not (0 <= self.bow_encoder_grad <= 1):
            raise ValueError(f"model.bow_encoder_grad must be between 0 and 1, got {self.bow_encoder_grad!r}")

    def part_names(self) -> tuple[str, ...]:
        """The logged loss parts ("loss" first) and statistics, fixed by the recipe."""
        names = ["loss"] + (["hybrid", "dense", "bow"] if self.mode == "hybrid" else [self.mode])
        if self.self_distill and self.mode == "hybrid":
            names.append("self_kd")
        if self.distill_weight > 0:
            names.append("teacher_kd")
        if self.bow_flops_weight > 0 and self.mode != "dense":
            names.append("bow_flops")
        if self.mode != "dense":
            names += ["bow_shared", "bow_to_dense"]
        return tuple(names)


STATS = ("bow_shared", "bow_to_dense")  # per-batch statistics, not losses


def grad_cache_plan(n_queries: int, group: int, chunk: int) -> list[tuple[str, int, int]]:
    """The chunks gradient caching encodes: (kind, first row, end row), queries first, then passages."""
    q = [("query", a, min(a + chunk, n_queries)) for a in range(0, n_queries, chunk)]
    n_p = n_queries * group
    return q + [("document", a, min(a + chunk, n_p)) for a in range(0, n_p, chunk)]


def grad_cache_passes(engine, batch: dict, denominators: dict, chunk: int):
    """Gradient caching (Gao et al. 2021; Tevatron's GradCache, sentence-transformers' cached losses) as
    DeepSpeed micro steps: (1) every chunk of texts is encoded without a graph, the RNG state saved before
    each; (2) the loss of the whole micro batch is computed from those representations and its gradient with
    respect to them kept; (3) each chunk is encoded again with a graph under its saved RNG state (the same
    dropout) and `rep . grad` is backpropagated, one DeepSpeed micro step per chunk (the trainer sets the
    accumulation to count chunks), so ZeRO reduces each parameter's gradient once per pass and the
    peak activation memory is that of one chunk. Yields (loss, parts) for the first pass, (loss, None) after.
    The surrogate is multiplied by the number of passes: DeepSpeed divides every pass by its accumulation."""
    from ..checkpoint import rng_state, set_rng_state

    module = engine.module
    n_q = len(batch["q_input_ids"])
    group = len(batch["p_input_ids"]) // n_q
    plan = grad_cache_plan(n_q, group, chunk)

    def encode(kind, a, b):
        prefix = "q_" if kind == "query" else "p_"
        return engine({"input_ids": batch[prefix + "input_ids"][a:b],
                       "attention_mask": batch[prefix + "attention_mask"][a:b]}, encode=kind)

    states, reps = [], []
    with torch.no_grad():
        for kind, a, b in plan:
            states.append(rng_state())
            reps.append(encode(kind, a, b))
    after = rng_state()

    def joined(kind, attr):
        parts = [getattr(r, attr) for (k, _, _), r in zip(plan, reps) if k == kind]
        if parts[0] is None:
            return None
        return torch.cat(parts).detach().requires_grad_(True)

    leaves = {(kind, attr): joined(kind, attr) for kind in ("query", "document") for attr in ("dense", "mu")}
    with torch.enable_grad():
        out = module.loss_from_reps(leaves["query", "dense"], leaves["query", "mu"], leaves["document", "dense"],
                                    leaves["document", "mu"], batch.get("teacher_scores"), denominators)
        present = {k: v for k, v in leaves.items() if v is not None}
        grads = dict(zip(present, torch.autograd.grad(out.loss, list(present.values()))))
    offsets = {"query": 0, "document": 0}
    for i, (kind, a, b) in enumerate(plan):
        set_rng_state(states[i])
        rep = encode(kind, a, b)
        surrogate = 0.0
        for attr in ("dense", "mu"):
            if (kind, attr) in grads:
                g = grads[kind, attr][offsets[kind] : offsets[kind] + (b - a)]
                surrogate = surrogate + (getattr(rep, attr) * g).sum()
        offsets[kind] += b - a
        yield surrogate * len(plan), (out.parts if i == 0 else None)
    set_rng_state(after)


class FinetuneOutput(NamedTuple):
    """A NamedTuple so that DeepSpeed's ZeRO-3 hooks see the loss (see engine/representation.Represented)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]  # detached 0-d tensors: read them with float() when needed


def gather_keep_local(t: torch.Tensor | None) -> torch.Tensor | None:
    """Every rank's `t` concatenated in rank order; this rank's slot is `t` itself, so its gradient flows."""
    import torch.distributed as dist

    if t is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts)


def _kl(target_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL(softmax(target) || softmax(student))."""
    log_t = F.log_softmax(target_logits, dim=-1)
    return (log_t.exp() * (log_t - F.log_softmax(student_logits, dim=-1))).sum()


class RetrieverTraining(nn.Module):
    """`forward(batch, denominators)` -> FinetuneOutput; `forward(batch, encode="query"|"document")` -> the
    representation of `batch["input_ids"]` (evaluation goes through forward so that ZeRO-3 gathers)."""

    def __init__(self, retriever: Retriever, cfg: RetrieverConfig):
        super().__init__()
        self.retriever = retriever
        self.cfg = cfg

    @property
    def lm(self):
        return self.retriever.lm

    @property
    def config(self):
        return self.retriever.lm.config

    def forward(self, batch: dict, denominators: dict | None = None, encode: str | None = None):
        modes = modes_needed(self.cfg.mode)
        if encode is not None:
            rep = self.retriever.represent(batch["input_ids"], batch["attention_mask"], modes)
            if encode == "document" and rep.mu is not None:
                rep = rep._replace(mu=scatter_top_k(rep.mu, self.cfg.bow_top_k))
            return rep
        q = self.retriever.represent(batch["q_input_ids"], batch["q_attention_mask"], modes)
        p = self.retriever.represent(batch["p_input_ids"], batch["p_attention_mask"], modes)
        p_mu = scatter_top_k(p.mu, self.cfg.bow_top_k) if p.mu is not None else None
        return self.loss_from_reps(q.dense, q.mu, p.dense, p_mu, batch.get("teacher_scores"), denominators)

    @torch.no_grad()
    def calibrate_bow_weight(self, batch: dict) -> float:
        """std(s_dense) / std(mu_q . mu_d) over one batch's query x passage scores, to 3 significant digits:
        the weight at which both parts of the hybrid score start with the same spread."""
        was = self.training
        self.eval()
        try:
            q = self.retriever.represent(batch["q_input_ids"], batch["q_attention_mask"], ("dense", "bow"))
            p = self.retriever.represent(batch["p_input_ids"], batch["p_attention_mask"], ("dense", "bow"))
        finally:
            self.train(was)
        dense = (q.dense @ p.dense.t()).double()
        bow = (q.mu @ scatter_top_k(p.mu, self.cfg.bow_top_k).t()).double()
        ratio = float(dense.std() / bow.std().clamp(min=1e-30))
        return float(f"{ratio:.3g}") if math.isfinite(ratio) and ratio > 0 else 1.0

    def loss_from_reps(self, q_dense, q_mu, p_dense, p_mu, teacher=None, denominators=None) -> FinetuneOutput:
        """The losses of a micro batch from its representations (documents already cut to their top-k)."""
        cfg = self.cfg
        world = 1
        if cfg.cross_rank_negatives:
            import torch.distributed as dist

            world = dist.get_world_size() if dist.is_initialized() else 1
            q_dense, q_mu, p_dense, p_mu = (gather_keep_local(t) for t in (q_dense, q_mu, p_dense, p_mu))
            teacher = gather_keep_local(teacher)
        n_q = len(q_dense if q_dense is not None else q_mu)
        n_p = len(p_dense if p_dense is not None else p_mu)
        if n_p % n_q:
            raise ValueError(f"{n_p} passages for {n_q} queries: every query needs a group of the same size")
        group = n_p // n_q
        target = torch.arange(n_q, device=(q_dense if q_dense is not None else q_mu).device) * group
        s = {}
        if q_dense is not None:
            s["dense"] = q_dense @ p_dense.t()
        if q_mu is not None:
            s["bow"] = cfg.bow_weight * (q_mu @ p_mu.t())
        if cfg.mode == "hybrid":
            s["hybrid"] = s["dense"] + s["bow"]
        tau = cfg.temperature
        terms = {}
        for name in (("hybrid", "dense", "bow") if cfg.mode == "hybrid" else (cfg.mode,)):
            terms[name] = F.cross_entropy(s[name] / tau, target, reduction="sum")
        weight = ({"hybrid": cfg.hybrid_loss_weight, "dense": cfg.part_loss_weight, "bow": cfg.part_loss_weight}
                  if cfg.mode == "hybrid" else {})
        loss = cfg.contrastive_weight * sum(weight.get(k, 1.0) * v for k, v in terms.items())
        if cfg.self_distill and cfg.mode == "hybrid":
            t = s["hybrid"].detach() / tau
            terms["self_kd"] = _kl(t, s["dense"] / tau) + _kl(t, s["bow"] / tau)
            loss = loss + terms["self_kd"]
        if cfg.distill_weight > 0:
            if teacher is None:
                raise ValueError("model.distill_weight > 0 but the batch carries no teacher scores "
                                 "(pos_scores / neg_scores in the training data)")
            cols = target[:, None] + torch.arange(group, device=target.device)[None, :]
            student = s[cfg.mode].gather(1, cols) / tau
            terms["teacher_kd"] = _kl(teacher.to(student.dtype) / cfg.teacher_temperature, student)
            loss = loss + cfg.distill_weight * terms["teacher_kd"]
        if cfg.bow_flops_weight > 0 and p_mu is not None:
            # SPLADE's FLOPS regularizer on the kept document weights: large exactly for ids that every
            # document keeps (the max-pool collapse); per micro batch, so scaled to the query sums above
            terms["bow_flops"] = (cfg.bow_weight * p_mu).abs().mean(0).pow(2).sum() * n_q
            loss = loss + cfg.bow_flops_weight * terms["bow_flops"]
        denom = max(float((denominators or {"queries": n_q / world})["queries"]), 1e-12)
        loss = loss / denom
        # every rank computed the loss of the global micro batch: each reports its 1/world share of it. The
        # parts stay tensors (detached): the trainer reads them once after the step's last backward is queued,
        # so no host synchronization sits between this forward and its backward
        parts = {"loss": loss.detach() / world} | {k: v.detach() / denom / world for k, v in terms.items()}
        if p_mu is not None:
            parts |= self._bow_stats(p_mu, s)
        return FinetuneOutput(loss, parts)

    @torch.no_grad()
    def _bow_stats(self, p_mu: torch.Tensor, s: dict) -> dict[str, torch.Tensor]:
        """bow_shared: the share of a document's kept ids that at least `shared_id_threshold` of the batch's
        documents also keep (the max-pool collapse: 1.0 when every document keeps the same ids);
        bow_to_dense: the spread of BoW scores over that of dense scores (how much of the hybrid is BoW)."""
        kept = p_mu != 0
        shared = kept.float().mean(0) >= self.cfg.shared_id_threshold
        share = ((kept & shared).sum(1).float() / kept.sum(1).clamp(min=1)).mean()
        ratio = (s["bow"].std() / s["dense"].std().clamp(min=1e-12)) if "dense" in s else share.new_zeros(())
        return {"bow_shared": share, "bow_to_dense": ratio.detach()}
