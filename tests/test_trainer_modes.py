"""Optimizer offload and bf16 train for real (CPU: DeepSpeedCPUAdam, bf16 autocast by DeepSpeed)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _losses(recipe: Path, run_dir: Path, *overrides: str) -> list[float]:
    out = subprocess.run([str(BIN / "dupmae"), "pretrain", "-c", str(recipe), f"train.run_dir={run_dir}",
                          *overrides], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_offload_and_bf16_track_the_fp32_run(tmp_path, tiny_recipe):
    recipe = tiny_recipe(tmp_path / "r.toml", tmp_path / "unused", dropout=False, train={"max_steps": 4})
    base = _losses(recipe, tmp_path / "fp32", "zero.stage=2")
    offload = _losses(recipe, tmp_path / "offload", "zero.stage=2", "zero.offload_optimizer=true")
    bf16 = _losses(recipe, tmp_path / "bf16", "zero.stage=2", "train.precision=bf16")
    assert len(base) == len(offload) == len(bf16) == 4
    # DeepSpeedCPUAdam is AdamW computed by another kernel: equal to float32 rounding
    assert offload == pytest.approx(base, rel=1e-5)
    # bf16 weights and activations: about 3 significant digits
    assert bf16 == pytest.approx(base, rel=1e-2)
    assert bf16 != base, "bf16 ran in fp32"
    ds = json.loads((tmp_path / "bf16" / "deepspeed.json").read_text())
    assert ds["bf16"]["enabled"] is True
    off = json.loads((tmp_path / "offload" / "deepspeed.json").read_text())
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
