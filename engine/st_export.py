"""sentence-transformers folders of a `dupmae export` folder: the dense and the BoW part of the DupMAE
representation, each loadable with plain sentence-transformers (no dupmae needed), each computing exactly what
`DupMAEEncoder` computes (checked by `verify_sentence_transformers`).

    write_sentence_transformers("exports/ft")     # -> exports/ft/sentence-transformers/{dense,sparse}

    dense/   SentenceTransformer: Transformer (the BERT encoder) -> Pooling (cls, or mean) -> Dense (D -> d', no
             bias, identity activation: W_cls; only when the export has dense_projection.safetensors)
             -> Normalize (only when the representation normalizes); similarity "dot".
                 SentenceTransformer(path).encode(texts) == DupMAEEncoder dense vectors
    sparse/  SparseEncoder: MLMTransformer (BertForMaskedLM: the MLM logits of every position) -> DupMAEBoWPooling
             (dupmae_bow_pooling.py in the folder: max over positions 1..len-1, no ReLU, documents keep their
             top-k); similarity "dot".
                 SparseEncoder(path, trust_remote_code=True).encode_query(q)    == mu of the query (all of it)
                 .encode_document(d)                                          == the document's top-k of mu
                 .similarity(q, d)                                            == DupMAE's BoW score

Both folders use the sentence-transformers 5.x module names and config files, which 5.x and 6.x load (6.x maps
the old names). The sparse folder's model.safetensors is a hard link to the export's own (a copy where the
file system has no hard links); the dense folder holds the encoder without the MLM head (BertModel).
sentence-transformers >= 6 loads the pooling module from the folder only with `trust_remote_code=True`
(5.x trusted local folders implicitly).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

ST_DIR = "sentence-transformers"
POOLING_FILE = Path(__file__).with_name("dupmae_bow_pooling.py")
POOLING_CLASS = "dupmae_bow_pooling.DupMAEBoWPooling"
TRANSFORMER_TYPE = "sentence_transformers.models.Transformer"
MLM_TRANSFORMER_TYPE = "sentence_transformers.sparse_encoder.models.MLMTransformer"


def _versions() -> dict:
    import torch
    import transformers

    try:
        from importlib.metadata import version

        st = version("sentence-transformers")
    except Exception:
        st = "5.1.0"  # the oldest release these folders are written for
    return {"sentence_transformers": st, "transformers": transformers.__version__, "pytorch": torch.__version__}


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _representation(folder: Path) -> dict:
    settings = folder / "dupmae.json"
    rep = json.loads(settings.read_text(encoding="utf-8")).get("representation", {}) if settings.is_file() else {}
    return {"dense": rep.get("dense", "cls"), "normalize": bool(rep.get("normalize", False)),
            "bow_top_k": int(rep.get("bow_top_k", 384)), "max_length": int(rep.get("max_length", 512))}


def write_sentence_transformers(folder: str | Path, out_dir: str | Path | None = None,
                                log=lambda m: None) -> dict[str, Path]:
    """Write `out_dir/dense` and `out_dir/sparse` (default `folder/sentence-transformers`) from the exported
    (or any BertForMaskedLM + tokenizer) `folder`; returns {"dense": path, "sparse": path}."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    from .representation import PROJECTION_FILE

    folder = Path(folder)
    out = Path(out_dir) if out_dir is not None else folder / ST_DIR
    rep = _representation(folder)
    config = BertConfig.from_pretrained(str(folder), local_files_only=True)
    max_length = min(rep["max_length"], int(config.max_position_embeddings))
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    weights = load_file(str(folder / "model.safetensors"))
    projection = load_file(str(folder / PROJECTION_FILE))["weight"] if (folder / PROJECTION_FILE).is_file() else None
    hidden = int(config.hidden_size)
    versions = _versions()
    if out.exists():
        shutil.rmtree(out)

    # dense: the encoder (BertModel; its pooler, unused by sentence-transformers, seeded so it loads cleanly)
    dense = out / "dense"
    torch.manual_seed(0)
    encoder = BertModel(config, add_pooling_layer=True)
    bert = {k[len("bert."):]: v for k, v in weights.items() if k.startswith("bert.")}
    missing, unexpected = encoder.load_state_dict(bert, strict=False)
    if unexpected or [k for k in missing if not k.startswith("pooler.")]:
        raise ValueError(f"{folder}: model.safetensors is not a BERT encoder: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    encoder.save_pretrained(str(dense), safe_serialization=True)
    tokenizer.save_pretrained(str(dense))
    _write_json(dense / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
    modules = [{"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_TYPE},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    _write_json(dense / "1_Pooling" / "config.json", {
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": rep["dense"] == "cls",
        "pooling_mode_mean_tokens": rep["dense"] == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False, "include_prompt": True})
    if projection is not None:
        if projection.ndim != 2 or projection.shape[1] != hidden:
            raise ValueError(f"{folder / PROJECTION_FILE}: W_cls of shape {tuple(projection.shape)} does not take "
                             f"the model's {hidden}-dimensional states")
        _write_json(dense / "2_Dense" / "config.json", {
            "in_features": hidden, "out_features": int(projection.shape[0]), "bias": False,
            "activation_function": "torch.nn.modules.linear.Identity"})
        from safetensors.torch import save_file

        save_file({"linear.weight": projection.float().contiguous()}, str(dense / "2_Dense" / "model.safetensors"),
                  metadata={"format": "pt"})
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    if rep["normalize"]:
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (dense / f"{len(modules) - 1}_Normalize").mkdir()
    _write_json(dense / "modules.json", modules)
    _write_json(dense / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer", "__version__": versions, "prompts": {}, "default_prompt_name": None,
        "similarity_fn_name": "dot"})

    # sparse: the whole BertForMaskedLM (the export's own file) + the BoW pooling module
    sparse = out / "sparse"
    sparse.mkdir(parents=True)
    _link_or_copy(folder / "model.safetensors", sparse / "model.safetensors")
    shutil.copy2(folder / "config.json", sparse / "config.json")
    tokenizer.save_pretrained(str(sparse))
    shutil.copy2(POOLING_FILE, sparse / POOLING_FILE.name)
    _write_json(sparse / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
    _write_json(sparse / "1_DupMAEBoWPooling" / "config.json", {
        "top_k_document": rep["bow_top_k"], "embedding_dimension": int(config.vocab_size), "drop_cls": True,
        "default_task": "document"})
    _write_json(sparse / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": MLM_TRANSFORMER_TYPE},
        {"idx": 1, "name": "1", "path": "1_DupMAEBoWPooling", "type": POOLING_CLASS}])
    _write_json(sparse / "config_sentence_transformers.json", {
        "model_type": "SparseEncoder", "__version__": versions, "prompts": {}, "default_prompt_name": None,
        "similarity_fn_name": "dot"})
    dims = int(projection.shape[0]) if projection is not None else hidden
    log(f"[export] sentence-transformers folders: {dense} (dense, {dims} dims), {sparse} (BoW, top "
        f"{rep['bow_top_k']} per document; load with trust_remote_code=True)")
    return {"dense": dense, "sparse": sparse}


def verify_sentence_transformers(folder: str | Path, st_dir: str | Path | None = None, texts: list[str] | None = None,
                                 atol: float = 1e-5) -> dict[str, float]:
    """Load both folders with sentence-transformers and compare with `DupMAEEncoder.from_pretrained(folder)` on
    `texts`: dense vectors, query and document BoW vectors, BoW scores. Returns the largest differences; raises
    AssertionError past `atol` (relative to the values' scale)."""
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer, SparseEncoder

    from .encoder import DupMAEEncoder

    folder = Path(folder)
    st_dir = Path(st_dir) if st_dir is not None else folder / ST_DIR
    texts = texts or ["a small bird that sings in the morning", "the court debated the question of law",
                      "destruction of a building by fire", ""]
    enc = DupMAEEncoder.from_pretrained(folder, device="cpu")
    ours_d = enc.encode(texts, kind="document")
    ours_q = enc.encode(texts, kind="query")
    mu_q = ours_q.bow_values if ours_q.full else None
    docs = np.zeros((len(texts), enc.vocab_size), np.float32)
    if ours_d.full:
        docs[:] = ours_d.bow_values
    else:
        np.put_along_axis(docs, ours_d.bow_ids.astype(np.int64), ours_d.bow_values, axis=1)

    def close(name, got, want):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        err = float(np.abs(got - want).max(initial=0.0))
        if got.shape != want.shape or err > atol * scale:
            raise AssertionError(f"{name}: sentence-transformers differs from DupMAEEncoder by {err:.3g} "
                                 f"(shapes {got.shape} vs {want.shape})")
        return err

    errors = {}
    dense_model = SentenceTransformer(str(st_dir / "dense"), device="cpu", local_files_only=True)
    errors["dense"] = close("dense", dense_model.encode(texts, convert_to_numpy=True), ours_d.dense)
    sparse_model = SparseEncoder(str(st_dir / "sparse"), device="cpu", local_files_only=True, trust_remote_code=True)
    q = sparse_model.encode_query(texts, convert_to_tensor=True, convert_to_sparse_tensor=False)
    d = sparse_model.encode_document(texts, convert_to_tensor=True, convert_to_sparse_tensor=False)
    if mu_q is not None:
        errors["query"] = close("query mu", q.cpu().numpy(), mu_q)
    errors["document"] = close("document top-k", d.cpu().numpy(), docs)
    ref = torch.from_numpy(mu_q if mu_q is not None else q.cpu().numpy()) @ torch.from_numpy(docs).T
    errors["bow_score"] = close("bow scores", sparse_model.similarity(q, d).cpu().numpy(), ref.numpy())
    return errors
