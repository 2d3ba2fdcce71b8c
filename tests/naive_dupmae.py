"""A NAIVE DupMAE written straight from DESIGN.md: full B x L x V logits, explicit B x L x L masks, and
`BertForMaskedLM(labels=...)` for the MLM loss. Test-only: it defines what `DupMAE` must compute.
It reuses a DupMAE's parameters so losses and gradients can be compared one to one."""
import math

import torch
import torch.nn.functional as F

from dupmae.kernels.philox import decoder_visibility


def naive_losses(model, batch: dict) -> dict:
    cfg, lm = model.cfg, model.lm
    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    out = lm(input_ids=ids, attention_mask=att, labels=labels, output_hidden_states=True, return_dict=True)
    mlm = out.loss
    logits = out.logits  # B x L x V
    hidden = out.hidden_states[-1]
    B, L, V = logits.shape

    # bag of words: max over positions 1..len-1 ([SEP] in, [CLS] and padding out; masked positions per switch)
    valid = att.bool().clone()
    valid[:, 0] = False
    if cfg.bow_positions == "unmasked":
        valid &= labels == -100
    mu = logits.masked_fill(~valid[:, :, None], float("-inf")).max(dim=1).values
    logp = torch.log_softmax(mu, dim=-1)
    target = torch.zeros(B, V, dtype=logp.dtype, device=logp.device)
    for b in range(B):
        n = int(batch["lengths"][b])
        text = batch["decoder_input_ids"][b, 1 : n - 1]
        target[b, torch.unique(text)] = 1.0 / len(text) if cfg.bow_normalization == "count" else 1.0
    bow = -(target * logp).sum(1).mean()

    # [CLS] decoding
    emb = lm.bert.embeddings
    h = hidden[:, :1]
    kv = torch.cat([h, emb(input_ids=batch["decoder_input_ids"])[:, 1:]], dim=1)
    if cfg.query_stream == "layernorm":
        q = emb(inputs_embeds=h.expand(B, L, h.shape[-1]))
    else:
        q = h + emb.position_embeddings(torch.arange(L, device=h.device))[None]
    mask = decoder_visibility(batch["decoder_seeds"], batch["word_ids"], batch["lengths"], cfg.p_dec,
                              sep_always_visible=cfg.sep_always_visible)  # B x L x L, explicit
    layer = model.enhanced_decoder
    sa = layer.attention.self
    H, d = sa.num_attention_heads, sa.attention_head_size

    def heads(x):
        return x.view(B, L, H, d).transpose(1, 2)

    scores = heads(sa.query(q)) @ heads(sa.key(kv)).transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that sees nothing: zeros
    context = (probs @ heads(sa.value(kv))).transpose(1, 2).reshape(B, L, H * d)
    attended = layer.attention.output(context, q)
    decoded = layer.output(layer.intermediate(attended), attended)
    dec_logits = lm.cls(decoded)  # B x L x V
    dec = F.cross_entropy(dec_logits.reshape(-1, V), batch["decoder_labels"].reshape(-1))
    return {"total": mlm + dec + cfg.w_bow * bow, "mlm": mlm, "dec": dec, "bow": bow}
