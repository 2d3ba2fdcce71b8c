"""The trainer's pieces, in this process: recipes and their errors, the DeepSpeed JSON, the learning-rate
schedule, weight-decay groups, the loss normalization behind gradient accumulation, and non-finite steps.

Multi-rank runs through real launchers are in test_distributed.py."""
from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dupmae.engine import trainer
from dupmae.engine.cli import main as cli_main
from dupmae.engine.config import ConfigError, RunConfig, load_config, parse_override
from dupmae.engine.model import DupMAE, ModelConfig
from dupmae.engine.trainer import EXIT_BAD_LOSS, deepspeed_config, lr_lambda, param_groups

from conftest import TINY_ENCODER

DUPMAE = Path(sys.executable).parent / "dupmae"


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def recipe_text(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(body, encoding="utf-8")
    return path


MINIMAL = """
[model]
encoder_config = { vocab_size = 100, hidden_size = 8, num_hidden_layers = 1, num_attention_heads = 1, intermediate_size = 16 }
[data]
shards = ["somewhere"]
"""


# -- recipes ---------------------------------------------------------------------------------------


def test_recipe_and_overrides_load(tmp_path):
    cfg = load_config(recipe_text(tmp_path, MINIMAL + "micro_batch = 3\n[optim]\nlr = 1\n"),
                      ["optim.lr=2e-4", "train.max_steps=50", "zero.stage=3", "model.kernels=reference",
                       "train.deepspeed_config=ds.json"])
    assert cfg.data.micro_batch == 3
    assert cfg.optim.lr == 2e-4 and cfg.train.max_steps == 50 and cfg.zero.stage == 3
    assert cfg.model.kernels == "reference"  # a bare word is a string
    assert cfg.train.deepspeed_config == "ds.json"
    assert load_config(recipe_text(tmp_path, MINIMAL + "[optim]\nlr = 1\n")).optim.lr == 1.0  # int -> float


@pytest.mark.parametrize("body, overrides, names", [
    (MINIMAL + "bogus = 1\n", [], "data.bogus"),
    (MINIMAL + "micro_batch = \"eight\"\n", [], "data.micro_batch"),
    (MINIMAL + "micro_batch = 2.5\n", [], "data.micro_batch"),
    (MINIMAL + "[train]\nmax_steps = true\n", [], "train.max_steps"),
    (MINIMAL + "[logging]\ntensorboard = 1\n", [], "logging.tensorboard"),
    (MINIMAL + "[bogus]\nx = 1\n", [], "[bogus]"),
    (MINIMAL, ["optim.lr"], "optim.lr"),  # no '='
    (MINIMAL, ["lr=1e-4"], "lr=1e-4"),  # no section
    (MINIMAL, ["optim.adam.lr=1"], "optim.adam.lr"),  # too deep
    (MINIMAL, ["optimizer.lr=1"], "optimizer"),  # unknown section
    (MINIMAL, ["optim.lrr=1"], "optim.lrr"),  # unknown key
    (MINIMAL, ["data.micro_batch=many"], "data.micro_batch"),  # wrong type
    (MINIMAL, ["zero.stage=4"], "zero.stage"),  # out of range
])
def test_config_errors_name_the_key(tmp_path, body, overrides, names):
    with pytest.raises(ConfigError) as e:
        load_config(recipe_text(tmp_path, body), overrides)
    assert names in str(e.value)


@pytest.mark.parametrize("override", ["model.p_dec=1.5", "model.kernels=tritonn", "model.w_bow=-1"])
def test_model_config_errors_are_config_errors(tmp_path, capsys, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key):
        load_config(recipe_text(tmp_path, MINIMAL), [override])
    assert cli_main(["pretrain", "--config", str(recipe_text(tmp_path, MINIMAL)), override]) == 2
    assert key in capsys.readouterr().err


def test_parse_override_values():
    assert parse_override("optim.lr=2e-4") == ("optim", "lr", 2e-4)
    assert parse_override("data.shards=[\"a\", \"b\"]") == ("data", "shards", ["a", "b"])
    assert parse_override("train.run_dir=runs/x") == ("train", "run_dir", "runs/x")
    assert parse_override("zero.offload_optimizer=true") == ("zero", "offload_optimizer", True)


@pytest.mark.parametrize("extra, message", [
    (["data.bogus=1"], "unknown key data.bogus"),
    (["optim.lr"], "override 'optim.lr': expected section.key=value"),
    (["data.micro_batch=lots"], "data.micro_batch: expected an integer"),
])
def test_cli_config_error_exit_2(tmp_path, capsys, extra, message):
    rc = cli_main(["pretrain", "--config", str(recipe_text(tmp_path, MINIMAL)), *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("dupmae pretrain: error:") and message in err


def test_cli_config_error_exit_2_subprocess(tmp_path):
    """The installed console script, as a user runs it: exit status 2 and one line naming the key."""
    missing = subprocess.run([str(DUPMAE), "pretrain", "--config", str(tmp_path / "nope.toml")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "config file not found" in missing.stderr
    bad = subprocess.run([str(DUPMAE), "pretrain", "--config", str(recipe_text(tmp_path, MINIMAL)),
                          "train.max_stepz=5"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stderr
    assert "unknown key train.max_stepz" in bad.stderr and "Traceback" not in bad.stderr


# -- the DeepSpeed JSON ----------------------------------------------------------------------------


def cfg_with(**sections) -> RunConfig:
    cfg = RunConfig()
    cfg.data.shards = ["x"]
    cfg.model.encoder_config = dict(TINY_ENCODER)
    for section, values in sections.items():
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    return cfg


@pytest.mark.parametrize("micro, accum, world", [(4, 1, 1), (4, 3, 2), (2, 2, 8)])
def test_deepspeed_batch_arithmetic(micro, accum, world):
    ds = deepspeed_config(cfg_with(data={"micro_batch": micro, "grad_accum": accum}), world)
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["train_batch_size"] == micro * accum * world


def test_deepspeed_gradient_clipping_is_explicit():
    # DeepSpeed clips at 1.0 when the key is absent: 0 (off) must be written, not left out
    assert deepspeed_config(cfg_with(optim={"grad_clip": 0.0}), 1)["gradient_clipping"] == 0.0
    assert deepspeed_config(cfg_with(optim={"grad_clip": 2.5}), 1)["gradient_clipping"] == 2.5


def test_deepspeed_zero_and_offload():
    plain = deepspeed_config(cfg_with(zero={"stage": 2}), 2)
    assert plain["zero_optimization"]["stage"] == 2
    assert "offload_optimizer" not in plain["zero_optimization"]
    off = deepspeed_config(cfg_with(zero={"stage": 2, "offload_optimizer": True}), 2)
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    z3 = deepspeed_config(cfg_with(zero={"stage": 3, "offload_optimizer": True}), 2)
    assert z3["zero_optimization"]["stage"] == 3
    assert z3["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False
    bf16 = deepspeed_config(cfg_with(train={"precision": "bf16"}), 1)
    assert bf16["bf16"]["enabled"] is True and bf16["fp16"]["enabled"] is False
    with pytest.raises(ConfigError, match="zero.offload_optimizer"):
        cfg_with(zero={"stage": 0, "offload_optimizer": True}).validate()


def test_deepspeed_user_json_merged(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"allgather_bucket_size": 12345},
                                "communication_data_type": "fp32", "train_batch_size": 16,
                                "gradient_accumulation_steps": 2}))
    ds = deepspeed_config(cfg_with(data={"micro_batch": 4, "grad_accum": 2}, zero={"stage": 1},
                                   train={"deepspeed_config": str(user)}), 2)
    assert ds["communication_data_type"] == "fp32"
    assert ds["zero_optimization"]["allgather_bucket_size"] == 12345
    assert ds["zero_optimization"]["stage"] == 1  # the recipe's keys of the same table survive
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 1.0


@pytest.mark.parametrize("key, value", [("train_batch_size", 99), ("train_micro_batch_size_per_gpu", 8),
                                        ("gradient_accumulation_steps", 4)])
def test_deepspeed_user_json_conflicting_batch(tmp_path, key, value):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({key: value}))
    cfg = cfg_with(data={"micro_batch": 4, "grad_accum": 2}, train={"deepspeed_config": str(user)})
    with pytest.raises(ConfigError) as e:
        deepspeed_config(cfg, 2)
    msg = str(e.value)
    assert f"{key} = {value} conflicts" in msg and "data.micro_batch 4 x data.grad_accum 2 x 2 ranks" in msg


@pytest.mark.parametrize("content, message", [
    (None, "not found"), ("{not json", "not valid JSON"), ('{"optimizer": {"type": "Adam"}}', "[optim]"),
    ('{"scheduler": {"type": "WarmupLR"}}', "[optim]")])
def test_deepspeed_user_json_errors(tmp_path, content, message):
    user = tmp_path / "ds.json"
    if content is not None:
        user.write_text(content)
    with pytest.raises(ConfigError, match="train.deepspeed_config|ds.json") as e:
        deepspeed_config(cfg_with(train={"deepspeed_config": str(user)}), 1)
    assert message in str(e.value)


# -- schedule and parameter groups ---------------------------------------------------------------------


def factors(schedule: str, max_steps=100, warmup=0.1, min_lr_ratio=0.0) -> list[float]:
    f = lr_lambda(cfg_with(train={"max_steps": max_steps},
                           optim={"schedule": schedule, "warmup": warmup, "min_lr_ratio": min_lr_ratio}))
    return [f(s) for s in range(max_steps + 1)]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_warmup(schedule):
    f = factors(schedule)  # warmup 0.1 of 100 steps: 10 steps
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f[10] == 1.0
    g = factors(schedule, warmup=4)  # >= 1: a number of steps
    assert g[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert factors(schedule, warmup=0.0)[0] == 1.0


def test_lr_linear_cosine_constant_shapes():
    lin, cos, const = factors("linear"), factors("cosine"), factors("constant")
    assert lin[55] == pytest.approx(0.5) and lin[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lin[10:], lin[11:]))
    assert all(lin[s] - lin[s + 1] == pytest.approx(1 / 90) for s in range(10, 100))  # straight line
    assert cos[55] == pytest.approx(0.5) and cos[100] == pytest.approx(0.0)
    assert cos[20] == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 90)))
    assert cos[20] > lin[20] and cos[90] < lin[90]  # slow start, fast middle, slow end
    assert const[10:] == [1.0] * 91
    assert factors("linear", min_lr_ratio=0.1)[100] == pytest.approx(0.1)
    assert factors("cosine", min_lr_ratio=0.1)[100] == pytest.approx(0.1)
    past_the_end = lr_lambda(cfg_with(train={"max_steps": 100}, optim={"min_lr_ratio": 0.1}))(150)
    assert past_the_end == pytest.approx(0.1)  # never below the floor


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return DupMAE.from_config(ModelConfig(encoder_config=dict(TINY_ENCODER), kernels="reference"))


def test_param_groups_give_scaled_parameters_groups_of_their_own(tiny_model):
    """lr_scale(name): parameters whose multiplier is not 1 get their own groups at lr x multiplier, split by
    decay like the rest; the two plain groups come first (group 0 is the one the logs report); each parameter
    appears once."""
    head = lambda n: 3.0 if ".cls.predictions.transform." in f".{n}" else 1.0  # noqa: E731
    groups = param_groups(tiny_model, 0.05, 2e-4, head)
    assert len(groups) == 4
    assert [g.get("lr") for g in groups] == [None, None, pytest.approx(6e-4), pytest.approx(6e-4)]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.05, 0.0]
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())
    assert {names[id(p)] for g in groups[2:] for p in g["params"]} == {
        n for n in names.values() if ".cls.predictions.transform." in f".{n}"}
    assert all(n.endswith(".bias") or "LayerNorm" in n for n in (names[id(p)] for p in groups[3]["params"]))
    assert len(param_groups(tiny_model, 0.05, 2e-4, lambda n: 1.0)) == 2  # no multiplier: the plain two


def test_param_groups_no_decay_and_tied_embedding(tiny_model):
    decay, no_decay = param_groups(tiny_model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    in_decay = [names[id(p)] for p in decay["params"]]
    in_no_decay = [names[id(p)] for p in no_decay["params"]]
    assert not set(in_decay) & set(in_no_decay)
    assert sorted(in_decay + in_no_decay) == sorted(names.values())  # every parameter, each once
    assert all(n.endswith(".bias") or "LayerNorm" in n for n in in_no_decay)
    assert not any(n.endswith(".bias") or "LayerNorm" in n for n in in_decay)
    assert any("LayerNorm.weight" in n for n in in_no_decay)
    # the word embeddings double as the MLM decoder weight: one parameter, decayed once
    emb = tiny_model.lm.bert.embeddings.word_embeddings.weight
    assert tiny_model.lm.cls.predictions.decoder.weight is emb
    assert sum(p is emb for p in decay["params"] + no_decay["params"]) == 1
    assert any(p is emb for p in decay["params"])
    assert any(p is tiny_model.lm.cls.predictions.decoder.bias for p in no_decay["params"])


def test_digest_covers_model_and_data_stream_not_batch_split():
    """The digest guards a resume: what the model is and which samples/masks it sees. The split of the global
    batch (micro batch x accumulation x ranks, checked by the sampler) and the worker count may change."""
    base = cfg_with(data={"micro_batch": 4, "num_workers": 1})
    for same in (cfg_with(data={"micro_batch": 4, "num_workers": 4}),
                 cfg_with(data={"micro_batch": 8, "num_workers": 1}),
                 cfg_with(data={"micro_batch": 2, "grad_accum": 2, "num_workers": 1}),
                 cfg_with(data={"micro_batch": 4, "num_workers": 1}, optim={"lr": 1.0}, train={"max_steps": 5})):
        assert same.digest() == base.digest()
    for other in (cfg_with(data={"micro_batch": 4, "num_workers": 1, "seed": 7}),
                  cfg_with(data={"micro_batch": 4, "num_workers": 1, "shards": ["y"]}),
                  cfg_with(data={"micro_batch": 4, "num_workers": 1, "encoder_mask_prob": 0.5}),
                  cfg_with(data={"micro_batch": 4, "num_workers": 1}, model={"w_bow": 1.0})):
        assert other.digest() != base.digest()


# -- the loss normalization behind gradient accumulation and data parallelism ---------------------------


def test_global_denominators_split_batch_equals_whole(tiny_shards):
    """Two halves of a batch, each divided by the counts of the WHOLE batch, sum to the whole batch's loss,
    and their gradients sum to its gradient (float64): what a trainer needs for micro steps and ranks."""
    from dupmae.data_pipeline.collator import DupMAECollator
    from dupmae.data_pipeline.dataset import open_datasets
    from dupmae.data_pipeline.tokenizer import tokenizer_info

    ds = open_datasets([str(tiny_shards)])
    info = tokenizer_info(str(tiny_shards / "tokenizer"))
    collate = DupMAECollator(info, seed=11, max_len=ds.max_len, pad_to_multiple_of=8)
    samples = [ds[i] for i in (5, 77, 310, 1200, 2048, 2500, 3000, 3100)]
    whole, first, second = collate(samples), collate(samples[:4]), collate(samples[4:])

    torch.manual_seed(0)
    encoder = dict(TINY_ENCODER, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = DupMAE.from_config(ModelConfig(encoder_config=encoder, kernels="reference")).double()
    model.train()

    def loss_and_grads(batch, denominators=None):
        model.zero_grad(set_to_none=True)
        out = model(batch, denominators=denominators)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, g_ref = loss_and_grads(whole)
    denominators = {"mlm": ref.mlm_tokens, "dec": ref.dec_tokens, "samples": 8}
    a, g_a = loss_and_grads(first, denominators)
    b, g_b = loss_and_grads(second, denominators)
    assert a.mlm_tokens + b.mlm_tokens == ref.mlm_tokens and a.dec_tokens + b.dec_tokens == ref.dec_tokens
    for part in ("loss", "mlm_loss", "dec_loss", "bow_loss"):
        together = (getattr(a, part) + getattr(b, part)).item()
        assert together == pytest.approx(getattr(ref, part).item(), rel=1e-12), part
    # the halves' own means do NOT average to the whole batch's loss: the global counts are needed
    with torch.no_grad():
        mean_a, mean_b = model(first).mlm_loss.item(), model(second).mlm_loss.item()
    assert (mean_a + mean_b) / 2 != pytest.approx(ref.mlm_loss.item(), rel=1e-6)
    assert g_ref.keys() == g_a.keys() == g_b.keys()
    for name, g in g_ref.items():
        torch.testing.assert_close(g_a[name] + g_b[name], g, rtol=1e-9, atol=1e-12, msg=name)


# -- non-finite losses, with the real trainer in this process (one gloo rank) ----------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank_env(monkeypatch) -> None:
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def one_rank(monkeypatch):
    """The environment of a 1-rank job; the signal handlers the trainer installs are put back after.
    DeepSpeed keeps a clone of the world group from an earlier run in this process (see
    test_run_twice_in_one_process): forget it, as a fresh process would."""
    import deepspeed.utils.groups

    one_rank_env(monkeypatch)
    monkeypatch.setattr(deepspeed.utils.groups, "_WORLD_GROUP", None)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def poison(monkeypatch, bad_calls, record=None):
    """DupMAE.forward, but the loss of the training calls numbered in `bad_calls` (1-based) is NaN;
    `record` gets a copy of every parameter as each call sees it (the state after the previous step)."""
    original = DupMAE.forward
    calls = []

    def forward(self, batch, denominators=None, with_accuracy=False):
        if record is not None:
            record.append(torch.cat([p.detach().flatten().clone() for p in self.parameters()]))
        out = original(self, batch, denominators=denominators, with_accuracy=with_accuracy)
        if self.training:
            calls.append(1)
            if len(calls) in bad_calls:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(DupMAE, "forward", forward)
    return calls


def test_nan_step_is_skipped_and_counted(tmp_path, tiny_recipe, one_rank, monkeypatch):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.toml", run_dir, dropout=False, train={"max_steps": 5, "max_bad_steps": 3},
                         zero={"stage": 2})
    cfg = load_config(recipe)
    seen = []
    poison(monkeypatch, bad_calls={2}, record=seen)
    assert trainer.run(cfg) == 0
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 3, 4, 5]  # step 2 skipped, the run goes on
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert torch.equal(seen[1], seen[2])  # the skipped step left every parameter as it was
    assert not torch.equal(seen[2], seen[3])
    f = lr_lambda(cfg)
    assert [r["lr"] for r in rows] == pytest.approx([cfg.optim.lr * f(s - 1) for s in (1, 3, 4, 5)])  # lr restored
    state = torch.load(run_dir / "checkpoints" / "step5" / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["bad_steps"] == 1 and state["step"] == 5


def test_too_many_nan_steps_exit_3(tmp_path, tiny_recipe, one_rank, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.toml", run_dir, dropout=False, train={"max_steps": 10, "max_bad_steps": 3})
    calls = poison(monkeypatch, bad_calls=set(range(3, 100)))
    assert cli_main(["pretrain", "--config", str(recipe)]) == EXIT_BAD_LOSS == 3
    assert len(calls) == 5  # steps 1, 2 fine; 3, 4, 5 bad; then it stops
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    err = capsys.readouterr().err
    assert "step 5: non-finite loss, step skipped (3/3)" in err and "3 non-finite losses: stopping" in err


def test_nan_step_leaves_optimizer_state_alone(tmp_path, tiny_recipe, one_rank, monkeypatch):
    recipe = tiny_recipe(tmp_path / "r.toml", tmp_path / "run", dropout=False, train={"max_steps": 3},
                         zero={"stage": 0})
    t = trainer.Trainer(load_config(recipe))
    snapshots = []
    original = DupMAE.forward

    def forward(self, batch, denominators=None, with_accuracy=False):
        snapshots.append({k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                          for k, s in enumerate(t.optimizer.state.values())})
        out = original(self, batch, denominators=denominators, with_accuracy=with_accuracy)
        if len(snapshots) == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(DupMAE, "forward", forward)
    try:
        assert t.train() == 0
    finally:
        t.close()
    before, after = snapshots[1], snapshots[2]  # around the skipped step 2
    assert before.keys() == after.keys() and before
    for k in before:
        torch.testing.assert_close(after[k]["exp_avg"], before[k]["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(after[k]["exp_avg_sq"], before[k]["exp_avg_sq"], rtol=0, atol=0)
        assert float(after[k]["step"]) == float(before[k]["step"])


def test_zero0_logs_grad_norm(tmp_path, tiny_recipe, one_rank):
    run_dir = tmp_path / "run"
    cfg = load_config(tiny_recipe(tmp_path / "r.toml", run_dir, dropout=False, train={"max_steps": 2},
                                  zero={"stage": 0}))
    assert trainer.run(cfg) == 0
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in read_metrics(run_dir))


def test_resume_with_new_max_steps_follows_the_new_schedule(tmp_path, tiny_recipe, one_rank, monkeypatch):
    """The optimizer's saved lr is that of the old schedule's last step (0 at the end of a linear decay):
    after loading, the lr must come from the schedule of the new max_steps at the resumed step."""
    import deepspeed.utils.groups

    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.toml", run_dir, optim={"warmup": 0.0, "schedule": "linear"})
    assert trainer.run(load_config(recipe, ["train.max_steps=3"])) == 0
    one_rank_env(monkeypatch)
    monkeypatch.setattr(deepspeed.utils.groups, "_WORLD_GROUP", None)
    cfg = load_config(recipe, ["train.max_steps=8"])
    assert trainer.run(cfg) == 0
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    f3, f8 = lr_lambda(load_config(recipe, ["train.max_steps=3"])), lr_lambda(cfg)
    assert [r["lr"] for r in rows[:3]] == pytest.approx([cfg.optim.lr * f3(s) for s in range(3)])
    assert [r["lr"] for r in rows[3:]] == pytest.approx([cfg.optim.lr * f8(s) for s in range(3, 8)])


def test_eval_lines_in_metrics(tmp_path, tiny_recipe, one_rank):
    run_dir = tmp_path / "run"
    cfg = load_config(tiny_recipe(tmp_path / "r.toml", run_dir, dropout=False,
                                  data={"eval_samples": 24}, train={"max_steps": 4, "eval_every": 2,
                                                                    "eval_batches": 2}))
    assert trainer.run(cfg) == 0
    rows = read_metrics(run_dir)
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert set(r) == {"step", "eval/loss", "eval/mlm", "eval/dec", "eval/bow", "eval/mlm_accuracy"}
        assert r["eval/loss"] == pytest.approx(r["eval/mlm"] + r["eval/dec"] + cfg.model.w_bow * r["eval/bow"])
        assert 0.0 <= r["eval/mlm_accuracy"] <= 1.0
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_run_twice_in_one_process(tmp_path, tiny_recipe, monkeypatch):
    import deepspeed.utils.groups

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    monkeypatch.setattr(deepspeed.utils.groups, "_WORLD_GROUP", None)
    try:
        for i in range(2):
            one_rank_env(monkeypatch)
            cfg = load_config(tiny_recipe(tmp_path / f"r{i}.toml", tmp_path / f"run{i}", train={"max_steps": 1}))
            assert trainer.run(cfg) == 0
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_deepspeed_user_json_contradicting_the_recipe_is_refused(tmp_path):
    """A key the recipe generates may be repeated with the same value, never silently overridden."""
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}))
    with pytest.raises(ConfigError, match=r"zero_optimization.stage = 3 contradicts the recipe's 1"):
        deepspeed_config(cfg_with(zero={"stage": 1}, train={"deepspeed_config": str(user)}), 1)
    user.write_text(json.dumps({"gradient_clipping": 0.5}))
    with pytest.raises(ConfigError, match=r"gradient_clipping = 0.5 contradicts the recipe's 1.0"):
        deepspeed_config(cfg_with(train={"deepspeed_config": str(user)}), 1)


def test_bf16_on_cpu_pretrains(tmp_path, tiny_recipe, one_rank, capsys):
    """train.precision = bf16 works on a CPU for pre-training: finite losses,
    weights held in bf16 by DeepSpeed, a resumable checkpoint; the warning where the CPU has no native bf16."""
    from dupmae.engine.metrics import cpu_bf16_native

    run_dir = tmp_path / "run"
    cfg = load_config(tiny_recipe(tmp_path / "r.toml", run_dir, dropout=False,
                                  train={"max_steps": 4, "precision": "bf16"}, zero={"stage": 1}))
    t = trainer.Trainer(cfg)
    try:
        assert next(t.engine.module.parameters()).dtype == torch.bfloat16
        assert t.train() == 0
    finally:
        t.close()
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert (run_dir / "checkpoints" / "latest_complete").read_text().strip() == "step4"
    warned = "precision = bf16 on a CPU without AVX512-BF16 or AMX" in capsys.readouterr().err
    assert warned == (not cpu_bf16_native())
