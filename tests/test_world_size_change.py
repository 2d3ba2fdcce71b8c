"""A run saved by 2 ranks resumes on 1 rank through DeepSpeed's universal checkpoint, data order preserved."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dupmae.data_pipeline.prepare import PrepareConfig, prepare

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECIPE = """
[model]
encoder_config = {{ vocab_size = 30522, hidden_size = 32, num_hidden_layers = 2, num_attention_heads = 2, intermediate_size = 64, max_position_embeddings = 64, hidden_dropout_prob = 0.0, attention_probs_dropout_prob = 0.0 }}
kernels = "reference"
[data]
shards = ["{shards}"]
micro_batch = 4
num_workers = 0
[train]
max_steps = 6
dist_timeout_s = 60
[zero]
stage = 2
[logging]
every = 1
tensorboard = false
[checkpoint]
every = 100
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], ranks: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if ranks > 1:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--no_local_rank", "--master_port", str(_port()),
               str(BIN / "dupmae"), *args]
    else:
        cmd = [str(BIN / "dupmae"), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _losses(run_dir: Path) -> dict[int, float]:
    return {d["step"]: d["loss"] for d in map(json.loads, (run_dir / "metrics.jsonl").open()) if "loss" in d}


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_two_ranks_to_one_through_universal_checkpoint(tmp_path):
    src = tmp_path / "docs.jsonl"
    with open(REPO / "data" / "wordnet" / "corpus.jsonl") as f, open(src, "w") as g:
        g.writelines(line for _, line in zip(range(1500), f))
    shards = tmp_path / "shards"
    prepare(PrepareConfig([str(src)], str(shards), max_len=32, workers=1, progress=False), log=lambda m: None)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE.format(shards=shards))

    full, moved = tmp_path / "full", tmp_path / "moved"
    _run(["pretrain", "-c", str(recipe), f"train.run_dir={full}"], ranks=2)
    _run(["pretrain", "-c", str(recipe), f"train.run_dir={moved}", "train.stop_at_step=3"], ranks=2)
    # 1 rank, the same global batch of 8: 4 x 2 accumulation steps
    out = _run(["pretrain", "-c", str(recipe), f"train.run_dir={moved}", "data.grad_accum=2"], ranks=1)
    assert "converting it to a universal checkpoint" in out.stderr
    assert "resumed from" in out.stderr and "step3_universal: step 3, 24 samples consumed" in out.stderr
    assert not (moved / "checkpoints" / "step3_universal").exists()  # the converted copy is pruned later

    a, b = _losses(full), _losses(moved)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (1, 2, 3):
        assert b[step] == a[step]
    # same samples, same masks, same weights: only float32 reduction order differs across world sizes
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    last = [json.loads(x) for x in (moved / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["consumed_samples"] == 6 * 8

    # a different global batch would change the data order: refused with a message saying so
    bad = subprocess.run([str(BIN / "dupmae"), "pretrain", "-c", str(recipe), f"train.run_dir={full}",
                          "train.max_steps=8", "data.micro_batch=2"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert bad.returncode != 0
    assert "global batch" in bad.stderr
    shutil.rmtree(tmp_path / "full", ignore_errors=True)
