"""Training metrics people act on: analytic FLOPs and MFU, throughput, memory, TensorBoard scalars.

FLOPs of one DupMAE training step, counted analytically from the batch (multiply-add = 2 FLOPs,
backward = 2x forward for matmuls whose inputs need gradients):
- encoder and enhanced decoder layers: 6 x (parameters of the layer's matmuls) per position, plus the
  attention products 12 x L x D per position and layer (scores and context, forward and backward);
- MLM-head transform: 6 x D^2 per position it runs on (all encoder positions, decoder label rows);
- bag-of-words projection: 2 x D x V per encoder position (its backward is O(B x V x D), not counted);
- L_mlm / L_dec projections: 6 x D x V per predicted position.
MFU = achieved FLOP/s / the device's peak (table below, dense bf16/fp16 tensor-core figures). On CPU
there is no meaningful peak: the console shows achieved GFLOP/s and MFU is logged as 0.
"""
from __future__ import annotations

import os
import resource

import torch

# dense bf16 peak FLOP/s per device, by a substring of torch.cuda.get_device_name()
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16). Without either, PyTorch's bf16
    matmuls emulate it and run far slower than fp32 (benchmarks/bench_bf16_cpu.py: 4x to 40x slower on an
    AVX2-only EPYC, by layout); with them, about 2x faster."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def step_flops(config, batch_shape: tuple[int, int], mlm_tokens: int, dec_tokens: int,
               objective: str = "dupmae") -> float:
    """Analytic FLOPs of forward + backward for one micro batch of shape (B, L), for a pre-training
    objective: "dupmae" (encoder, decoder layer, BoW projection of every position, both heads), "retromae"
    (no BoW: the head's transform on the masked and decoded rows only), "mlm" (encoder and MLM head only)."""
    B, L = batch_shape
    D, V, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    ffn = config.intermediate_size
    per_layer_params = 4 * D * D + 2 * D * ffn
    positions = B * L
    if objective == "mlm":
        dec_tokens = 0
    decoder_layers = 0 if objective == "mlm" else 1
    layer_flops = (layers + decoder_layers) * positions * (6 * per_layer_params + 12 * L * D)
    if objective == "dupmae":
        transform = 6 * D * D * (positions + dec_tokens)
        bow = 2 * D * V * positions
    else:
        transform = 6 * D * D * (mlm_tokens + dec_tokens)
        bow = 0
    heads = 6 * D * V * (mlm_tokens + dec_tokens)
    return float(layer_flops + transform + bow + heads)


def encoder_flops(config, batch_shape: tuple[int, int], bow: bool) -> float:
    """Analytic FLOPs of forward + backward of the encoder on (B, L) texts, plus, with `bow`, the MLM head's
    transform and the vocabulary projection of the max-pool (forward; its backward is sparse)."""
    B, L = batch_shape
    D, V, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    positions = B * L
    flops = layers * positions * (6 * (4 * D * D + 2 * D * config.intermediate_size) + 12 * L * D)
    if bow:
        flops += 6 * D * D * positions + 2 * D * V * positions
    return float(flops)


def peak_memory_bytes() -> int:
    """Peak accelerator memory on GPU; the process's peak resident set on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class TensorBoard:
    """Scalars by rank 0 only, the optimizer step as x-axis. A no-op elsewhere or when disabled."""

    def __init__(self, log_dir: str | os.PathLike, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
