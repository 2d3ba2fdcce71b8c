"""Dispatch: which implementation runs where; `import dupmae.kernels` without Triton; the whole DupMAE model on
the Triton path equals the reference path, also under ZeRO-3 (weights gathered by DeepSpeed, looked up in
forward)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dupmae import kernels
from kernel_cases import DEVICE, needs_kernels, needs_liger

pytestmark = pytest.mark.kernels


def test_auto_is_the_reference_on_cpu_and_the_flags_override(monkeypatch):
    t = torch.zeros(2)
    monkeypatch.delenv(kernels.IMPL_ENV, raising=False)
    assert kernels.resolve_impl("bow_max_pool", t) == "reference"
    assert kernels.resolve_impl("bow_max_pool", t, "auto") == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.resolve_impl("decoder_attention", t, "triton") == "triton"
    monkeypatch.setenv(kernels.IMPL_ENV, "reference")
    assert kernels.resolve_impl("decoder_attention", t, "auto") == "reference"  # the model's default defers
    assert kernels.resolve_impl("decoder_attention", t, "triton") == "triton"  # an explicit choice wins
    monkeypatch.setenv(kernels.IMPL_ENV, "fast")
    with pytest.raises(ValueError, match=kernels.IMPL_ENV):
        kernels.resolve_impl("bow_max_pool", t)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="CUDA"):
        kernels.resolve_impl("bow_max_pool", t, "triton")


def test_kernels_import_and_run_the_reference_without_triton():
    code = """
import sys
sys.modules["triton"] = None  # import triton -> ImportError
sys.modules["liger_kernel"] = None
import torch
from dupmae import kernels
h = torch.randn(2, 5, 8); w = torch.randn(11, 8)
mu, _ = kernels.bow_max_pool(h, w, None, torch.ones(2, 5, dtype=torch.bool))
assert mu.shape == (2, 11)
try:
    kernels.resolve_impl("bow_max_pool", h.cuda() if torch.cuda.is_available() else h, "triton")
except RuntimeError as e:
    print("refused:", e)
"""
    env = {"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refused: no Triton implementation of bow_max_pool" in out.stdout


def tiny_model_and_batch(kernel_impl: str, vocab=997, seed=0):
    """A 1-layer, 32-wide DupMAE over a `vocab`-word vocabulary (the interpreter's time grows with it) and a
    batch of 4 samples of random ids, one of them of length 3 ([CLS] x [SEP])."""
    import copy

    from dupmae.data_pipeline.collator import DupMAECollator
    from dupmae.data_pipeline.tokenizer import tokenizer_info
    from dupmae.engine.model import DupMAE, ModelConfig

    info = copy.copy(tokenizer_info())
    object.__setattr__(info, "vocab_size", vocab)
    g = np.random.default_rng(seed)
    samples = [(i, g.integers(200, vocab, size=int(n)).astype(np.uint16)) for i, n in enumerate((30, 7, 19, 1))]
    batch = DupMAECollator(info, seed=seed, max_len=64)(samples)
    torch.manual_seed(seed)
    cfg = ModelConfig(encoder_config=dict(vocab_size=info.vocab_size, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                      kernels=kernel_impl)
    model = DupMAE.from_config(cfg).to(DEVICE)
    return model, {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@needs_kernels
@needs_liger
def test_dupmae_on_the_triton_path_equals_the_reference_path():
    """float32: the three losses and every parameter's gradient."""
    model, batch = tiny_model_and_batch("reference")
    out = model(batch)
    ref_grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    model.cfg.kernels = "triton"
    calls = []
    for op in ("bow_max_pool", "decoder_attention", "linear_cross_entropy"):
        impl = kernels._triton_ops()[op]
        kernels._TRITON[op] = lambda *a, _impl=impl, _op=op, **kw: calls.append(_op) or _impl(*a, **kw)
    try:
        out2 = model(batch)
    finally:
        kernels._TRITON = None
    assert sorted(set(calls)) == ["bow_max_pool", "decoder_attention", "linear_cross_entropy"]
    grads = torch.autograd.grad(out2.loss, list(model.parameters()), allow_unused=True)
    for part, value in out.parts().items():
        assert out2.parts()[part] == pytest.approx(value, rel=1e-5), part
    scale = max(float(g.norm()) for g in ref_grads if g is not None)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        assert (a is None) == (b is None), name
        if b is not None:  # relative to the largest gradient: attention key biases are analytically ~0
            assert float((a - b).norm()) <= 1e-5 * max(float(b.norm()), 1e-3 * scale), name


@pytest.mark.slow
@needs_kernels
@needs_liger
@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU (gloo) trainer run; on a GPU the gpu tests cover the model")
def test_zero3_training_on_the_triton_path_follows_the_reference_path(tmp_path, tiny_recipe):
    """`dupmae pretrain` under ZeRO-3 (one gloo rank: parameters partitioned and gathered around each module's
    forward), 2 steps of 2 samples, the interpreter running the kernels: losses and gradient norms as the reference path."""
    runs = {}
    procs = {}
    for impl in ("reference", "triton"):
        run_dir = tmp_path / impl
        recipe = tiny_recipe(tmp_path / f"{impl}.toml", run_dir, dropout=False, model={"kernels": impl},
                             train={"max_steps": 2}, zero={"stage": 3}, data={"micro_batch": 2})
        procs[impl] = subprocess.Popen([str(Path(sys.executable).parent / "dupmae"), "pretrain", "--config",
                                        str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        runs[impl] = run_dir
    for impl, proc in procs.items():
        log, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, log[-4000:]
        assert "ZeRO-3" in log
    lines = {impl: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
             for impl, d in runs.items()}
    assert len(lines["triton"]) == len(lines["reference"]) == 2
    for a, b in zip(lines["triton"], lines["reference"]):
        for key in ("loss", "mlm", "dec", "bow", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
