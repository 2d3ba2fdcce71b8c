"""A run saved by 2 ranks resumes on 1 rank through DeepSpeed's universal checkpoint, data order preserved."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

BIN = Path(sys.executable).parent


def _run(args: list[str], ranks: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if ranks > 1:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--no_local_rank", "--master_port", str(free_port()),
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
def test_two_ranks_to_one_through_universal_checkpoint(tmp_path, tiny_recipe):
    recipe = tiny_recipe(tmp_path / "tiny.toml", tmp_path / "unused", dropout=False,
                         train={"max_steps": 6, "dist_timeout_s": 60}, zero={"stage": 2},
                         logging={"every": 1, "tensorboard": False}, checkpoint={"every": 100})

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
