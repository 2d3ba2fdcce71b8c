"""benchmarks/sass_model.py: the static model runs on the compiled sm_90 code and counts what it claims."""
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernels
ROOT = Path(__file__).resolve().parents[1]


def test_model_rows_for_the_short_shape(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("liger_kernel")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sass_model

    out = tmp_path / "model.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_model.py"), "--shape", "L150",
                           "--out-csv", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["kernel"]: r for r in csv.DictReader(out.open())}
    kernels = {"_bow_fwd_kernel", "_bow_dweight_kernel", "_bow_dhidden_kernel", "_attn_fwd_kernel",
               "_attn_dkdv_kernel", "_attn_dq_kernel"}
    assert kernels <= set(rows), set(rows)
    for k in kernels:
        assert float(rows[k]["serial_ms"]) >= float(rows[k]["overlap_ms"]) > 0, rows[k]
        assert int(rows[k]["instructions"]) > 0
    lengths = sass_model.lengths_of(sass_model.SHAPES["L150"])
    bow = rows["_bow_fwd_kernel"]  # 64-position tiles at L=150, 128 words, one loop iteration per tile
    assert bow["iteration"].startswith("64 positions x 128 words")
    assert int(bow["iterations"]) == math.ceil(sass_model.V / 128) * sum(math.ceil(n / 64) for n in lengths)
    assert int(bow["tensor"]) > 0 and int(rows["_attn_fwd_kernel"]["tensor"]) > 0  # the dots are in the loops
    assert int(rows["_bow_dweight_kernel"]["tensor"]) == 0
    for op in ("bow_max_pool", "decoder_attention"):
        assert float(rows[f"{op} fwd+bwd"]["naive_lower_ms"]) > 0
