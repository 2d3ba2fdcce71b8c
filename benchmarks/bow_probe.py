"""Where a BoW part's ranking comes from, before and after fine-tuning: the ids a query shares with a document
against the "expansion" ids (those of mu that are not the text's own word pieces), and how the weights follow IDF.

    python benchmarks/bow_probe.py                        # the CPU preset's pre-trained starts, then seed 1 of
                                                          # the parts-apart recipe from each, on SciFact test
    python benchmarks/bow_probe.py --recipe hybrid --starts dupmae

Reads the pre-trained exports of `pretraining_helps.py` (its work folder, default work/pretraining-helps-PRESET:
run that first) and fine-tunes each start once more exactly as that script does (same recipe, seed and steps: the
same run, whose export that script deletes after evaluating it), keeping the export under <work>/probe/. For each
model, on SciFact test with the representation the evaluation serves (documents keep the top 384 entries of mu,
queries all of it, Eq. 12):
  bow                   NDCG@10 of the BoW part as evaluated
  bow_exact_ids_only    the same documents, each query's mu kept only on its own word pieces: exact matching
  bow_expansion_only    the rest of the score: every other id of the query against the document's kept ids
  kept_ids_in_text      share of a document's kept ids that are its own word pieces (first 1,000 documents)
  own_weight_idf_spearman  per document, Spearman between its own word pieces' weights and their IDF (mean)
  head_bias_idf_spearman   Spearman between the MLM head's output bias and IDF over the ids in the corpus
Writes results/bow_probe{,_PRESET}.csv (rows of models probed before are kept: an export does not change).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretraining_helps as ph  # noqa: E402


def probe(folder: Path, data, max_length: int, n_docs: int = 1000) -> dict:
    import numpy as np
    from scipy.stats import spearmanr

    from dupmae.engine.encoder import DupMAEEncoder
    from dupmae.engine.evaluate import metrics, run_from_ranking

    def ndcg(scores):
        idx = np.argsort(-scores, axis=1)[:, :100]
        return metrics(data.qrels, run_from_ranking(data, np.take_along_axis(scores, idx, 1), idx))["ndcg@10"]

    def pieces(flat, off, i):  # a text's own word pieces, [CLS] and [SEP] left out
        return flat[off[i] + 1:off[i + 1] - 1]

    enc = DupMAEEncoder.from_pretrained(str(folder), max_length=max_length)
    docs = enc.encode(data.corpus_texts, kind="document", modes=("bow",))
    queries = enc.encode(data.query_texts, kind="query", modes=("bow",))
    q = queries.bow_values  # all of mu: (queries, vocab)
    d = docs.bow_matrix().T.tocsr()  # the kept entries: (vocab, documents)
    qflat, qoff = enc.tokenize(data.query_texts)
    own = np.zeros(q.shape, dtype=bool)
    for i in range(len(q)):
        own[i, pieces(qflat, qoff, i)] = True
    full = np.asarray((d.T @ q.T).T)
    exact = np.asarray((d.T @ np.where(own, q, 0).T).T)
    dflat, doff = enc.tokenize(data.corpus_texts)
    df = np.zeros(enc.vocab_size)
    for i in range(len(doff) - 1):
        df[np.unique(pieces(dflat, doff, i))] += 1
    idf = np.log(len(doff) / (df + 1))
    rhos, in_text = [], []
    for i in range(min(n_docs, len(doff) - 1)):
        t = np.unique(pieces(dflat, doff, i))
        kept = dict(zip(docs.bow_ids[i].tolist(), docs.bow_values[i].tolist()))
        w = np.array([kept.get(int(x), np.nan) for x in t])
        ok = ~np.isnan(w)
        if ok.sum() > 3:
            rhos.append(spearmanr(w[ok], idf[t[ok]]).statistic)
        in_text.append(float(np.isin(docs.bow_ids[i], t).mean()))
    bias = enc.lm.cls.predictions.decoder.bias
    seen = df > 0
    return {"bow": ndcg(full), "bow_exact_ids_only": ndcg(exact), "bow_expansion_only": ndcg(full - exact),
            "kept_ids_in_text": float(np.mean(in_text)), "own_weight_idf_spearman": float(np.nanmean(rhos)),
            "head_bias_idf_spearman": float(spearmanr(bias.detach().float().numpy()[seen], idf[seen]).statistic)
            if bias is not None else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(ph.PRESETS), default="cpu")
    ap.add_argument("--work", default=None, help="pretraining_helps.py's work folder")
    ap.add_argument("--starts", default="mlm,retromae,dupmae", help="pre-trained starts (exports/<start>)")
    ap.add_argument("--recipe", choices=sorted(ph.HYBRID_RECIPES), default="apart")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--data", default=None, help=f"folder holding scifact/ (default {ph.SHARED})")
    args = ap.parse_args()
    from dupmae.engine.evaluate import load_beir

    p = dict(ph.PRESETS[args.preset])
    work = ph.work_dir(args)
    scifact = Path(args.data).resolve() / "scifact" if args.data else ph.SCIFACT
    ph.SCIFACT = scifact  # finetune_args reads it
    data = load_beir(scifact, "test")
    n_train = sum(1 for _ in open(scifact / "qrels" / "train.tsv")) - 1
    steps = p.get("ft_steps") or max(1, p["ft_epochs"] * n_train // (p["ft_micro"] * p["ranks"]))
    if args.preset == "smoke":  # a pipeline check: its file stays in its work folder, as pretraining_helps.py's
        ph.RESULTS = work / "results"
    out = ph.RESULTS / f"bow_probe{ph._suffix(args.preset)}.csv"
    rows = {}
    if out.exists():
        with open(out, newline="") as f:
            rows = {r["model"]: r for r in csv.DictReader(f)}
    mode, extra = ph.HYBRID_RECIPES[args.recipe]
    for start in args.starts.split(","):
        pre = work / "exports" / start
        if not pre.is_dir():
            raise SystemExit(f"{pre}: no pre-trained export; run benchmarks/pretraining_helps.py first (same --work)")
        name = f"ft-{start}-{args.recipe}-seed{args.seed}"
        export = work / "probe" / name / "export"
        if not export.is_dir():  # the benchmark's own fine-tuning run, once more, export kept
            run_dir = work / "probe" / name / "run"
            log = work / "probe" / f"{name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            ph.launch(ph.finetune_args(p, pre, run_dir, mode, args.seed, steps, p["ft_lr"], extra), p["ranks"], log)
            ph.sh([*ph.DUPMAE, "export", run_dir, export, "--overwrite"], log)
        for model, folder, stage in ((start, pre, "pre-trained"), (name, export, "fine-tuned")):
            if model in rows:
                continue
            m = probe(folder, data, p["p_len"])
            rows[model] = {"date": dt.date.today().isoformat(), "machine": ph.machine_name(), "commit": ph._commit(),
                           "preset": args.preset, "model": model, "start": start, "stage": stage,
                           **{k: f"{v:.4f}" for k, v in m.items()}}
            ph.log(f"{model}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
            ph.RESULTS.mkdir(parents=True, exist_ok=True)
            with open(out, "w", newline="") as f:  # after every model: a killed run keeps what it measured
                w = csv.DictWriter(f, fieldnames=list(rows[model]))
                w.writeheader()
                w.writerows(rows.values())
    ph.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
