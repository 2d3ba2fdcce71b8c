"""`dupmae export`: real runs (one process with ZeRO-0, two ranks with ZeRO-3 through the deepspeed launcher),
exported, reloaded with plain `transformers`, and checked against what the trained model computed: the
held-out losses the trainer logged at its last step must come out of the exported folder again."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

from dupmae.engine.export import DECODER_FILE, SETTINGS_FILE, ExportError, export

BIN = Path(sys.executable).parent
STEPS = 4
EVAL = {"data": {"eval_samples": 24}, "train": {"max_steps": STEPS, "eval_every": STEPS, "eval_batches": 6}}


def _train(tmp: Path, tiny_recipe, name: str, stage: int, ranks: int) -> Path:
    run_dir = tmp / name
    recipe = tiny_recipe(tmp / f"{name}.toml", run_dir, dropout=True, zero={"stage": stage}, **EVAL)
    cmd = [str(BIN / "dupmae"), "pretrain", "--config", str(recipe)]
    if ranks == 2:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--no_local_rank", "--master_port", str(free_port()), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_recipe) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("export-runs")
    return {"zero0": _train(tmp, tiny_recipe, "zero0", 0, 1), "zero3": _train(tmp, tiny_recipe, "zero3", 3, 2)}


def logged_eval(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/loss" in r and r["step"] == STEPS][-1]


def eval_losses_from_export(folder: Path, run_dir: Path) -> dict:
    """The trainer's evaluation (same held-out samples, same masks) with a model rebuilt from the export."""
    from dupmae.data_pipeline.collator import DupMAECollator
    from dupmae.data_pipeline.dataset import open_datasets
    from dupmae.data_pipeline.tokenizer import tokenizer_info
    from dupmae.engine.config import load_config
    from dupmae.engine.model import DupMAE, ModelConfig

    cfg = load_config(run_dir / "config.toml")
    settings = json.loads((folder / SETTINGS_FILE).read_text())["model"]
    model = DupMAE.from_config(ModelConfig(**(settings | {"encoder": str(folder), "encoder_config": None}))).eval()
    ds = open_datasets(cfg.data.shards, cfg.data.weights)
    collator = DupMAECollator(tokenizer_info(str(Path(cfg.data.shards[0]) / "tokenizer")), seed=cfg.data.seed,
                              max_len=ds.max_len, encoder_mask_prob=cfg.data.encoder_mask_prob)
    n_train = len(ds) - cfg.data.eval_samples
    ids = list(range(n_train, len(ds)))
    sums = [0.0] * 6
    with torch.no_grad():
        for i in range(0, len(ids), cfg.data.micro_batch):
            chunk = ids[i : i + cfg.data.micro_batch]
            out = model(collator([ds[j] for j in chunk]))
            sums = [a + b for a, b in zip(sums, [out.mlm_loss.item() * out.mlm_tokens,
                                                 out.dec_loss.item() * out.dec_tokens, out.bow_loss.item() * len(chunk),
                                                 out.mlm_tokens, out.dec_tokens, len(chunk)])]
    mlm, dec, bow = sums[0] / sums[3], sums[1] / sums[4], sums[2] / sums[5]
    return {"eval/mlm": mlm, "eval/dec": dec, "eval/bow": bow, "eval/loss": mlm + dec + cfg.model.w_bow * bow}


@pytest.mark.parametrize("name", ["zero0", "zero3"])
def test_export_reproduces_the_trained_model(runs, tmp_path, name):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    run_dir = runs[name]
    out = export(run_dir, tmp_path / "hf")
    for f in ("config.json", "model.safetensors", "tokenizer.json", DECODER_FILE, SETTINGS_FILE):
        assert (out / f).is_file(), f
    assert not (tmp_path / "hf.partial").exists()

    # plain transformers loads it as it is: nothing missing, the head tied, the bias kept
    lm, info = AutoModelForMaskedLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert lm.cls.predictions.decoder.weight.data_ptr() == lm.bert.embeddings.word_embeddings.weight.data_ptr()
    assert lm.cls.predictions.bias.abs().sum() > 0  # trained, not a fresh zero bias
    enc = AutoModel.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    batch = tok(["the termination of something", "a small bird"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(enc(**batch).last_hidden_state, lm.bert(**batch).last_hidden_state)

    # the exported weights compute the very losses the trained engine logged on the held-out samples
    logged = logged_eval(run_dir)
    ours = eval_losses_from_export(out, run_dir)
    for key in ("eval/mlm", "eval/dec", "eval/bow", "eval/loss"):
        assert ours[key] == pytest.approx(logged[key], rel=1e-5), (key, ours[key], logged[key])

    settings = json.loads((out / SETTINGS_FILE).read_text())
    assert settings["source"]["step"] == STEPS
    assert settings["representation"] == {"dense": "cls", "bow_top_k": 384, "max_length": 32}


def test_export_of_one_checkpoint_folder_and_cli(runs, tmp_path):
    ckpt = runs["zero0"] / "checkpoints" / f"step{STEPS}"
    proc = subprocess.run([str(BIN / "dupmae"), "export", str(ckpt), str(tmp_path / "a"), "--top-k", "64"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith(str(tmp_path / "a"))
    assert json.loads((tmp_path / "a" / SETTINGS_FILE).read_text())["representation"]["bow_top_k"] == 64
    # refuses to write into a non-empty folder without --overwrite: exit 2, a clear line, nothing changed
    before = sorted(p.name for p in (tmp_path / "a").iterdir())
    proc = subprocess.run([str(BIN / "dupmae"), "export", str(ckpt), str(tmp_path / "a")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "not empty" in proc.stderr and "--overwrite" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before


def test_export_errors_name_the_problem(runs, tmp_path):
    with pytest.raises(ExportError, match="no such run directory"):
        export(tmp_path / "nope", tmp_path / "o1")
    with pytest.raises(ExportError, match="no complete checkpoint"):
        export(tmp_path, tmp_path / "o2")
    # a checkpoint whose save never finished (no marker) is refused
    broken = tmp_path / "run"
    shutil.copytree(runs["zero3"], broken)
    (broken / "checkpoints" / f"step{STEPS}" / "dupmae_complete.json").unlink()
    (broken / "checkpoints" / "latest_complete").unlink()
    with pytest.raises(ExportError, match="no complete checkpoint"):
        export(broken, tmp_path / "o3")
    # a truncated ZeRO shard: the error names the checkpoint folder; no output folder is left behind
    damaged = tmp_path / "damaged"
    shutil.copytree(runs["zero3"], damaged)
    shard = sorted((damaged / "checkpoints" / f"step{STEPS}").glob("*optim_states.pt"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ExportError, match=f"step{STEPS}"):
        export(damaged, tmp_path / "o4")
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o4.partial").exists()


def test_pretraining_continues_from_an_export(runs, tmp_path):
    """A recipe whose model.encoder is an export restores the enhanced decoder too, not a fresh one."""
    from safetensors.torch import load_file

    from dupmae.engine.model import DupMAE, ModelConfig

    out = export(runs["zero0"], tmp_path / "hf")
    model = DupMAE.from_config(ModelConfig(encoder=str(out), kernels="reference"))
    saved = load_file(str(out / DECODER_FILE))
    assert saved.keys() == model.enhanced_decoder.state_dict().keys()
    for k, v in model.enhanced_decoder.state_dict().items():
        assert torch.equal(v, saved[k]), k


@pytest.mark.parametrize("objective", ["mlm", "retromae"])
def test_objective_runs_log_their_losses_and_export(tmp_path, tiny_recipe, objective):
    """`model.objective` runs through the trainer: only its losses are logged, and the export of an "mlm" run
    has no decoder (a DupMAE recipe starting from it builds a fresh one)."""
    from dupmae.engine.model import DupMAE, ModelConfig

    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.toml", run_dir, dropout=True, model={"objective": objective}, **EVAL)
    proc = subprocess.run([str(BIN / "dupmae"), "pretrain", "--config", str(recipe)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kept = {"mlm": {"mlm"}, "retromae": {"mlm", "dec"}}[objective]
    train_rows = [r for r in rows if "lr" in r]
    assert len(train_rows) == STEPS
    for r in train_rows:
        assert kept <= r.keys() and not ({"mlm", "dec", "bow"} - kept) & r.keys(), r
        assert r["loss"] == pytest.approx(sum(r[k] for k in kept), rel=1e-5)
    out = export(run_dir, tmp_path / "hf")
    assert (out / DECODER_FILE).exists() == (objective == "retromae")
    assert json.loads((out / SETTINGS_FILE).read_text())["model"]["objective"] == objective
    model = DupMAE.from_config(ModelConfig(encoder=str(out), kernels="reference"))
    assert model.enhanced_decoder is not None  # the default objective (dupmae) builds its decoder
