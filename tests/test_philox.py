"""The PyTorch Philox port is bit-identical to Triton's `tl.rand`, so kernels can regenerate masks."""
import importlib.util
import os

import numpy as np
import pytest
import torch

from dupmae.kernels import philox

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _triton_rand(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """tl.rand(seeds[b], offsets[b, :]) through the Triton interpreter, seeds loaded as int64 like a kernel."""
    os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit is applied, below
    import triton
    import triton.language as tl

    @triton.jit
    def rand_kernel(seed_ptr, offset_ptr, out_ptr, N: tl.constexpr):
        b = tl.program_id(0)
        seed = tl.load(seed_ptr + b)
        cols = tl.arange(0, N)
        off = tl.load(offset_ptr + b * N + cols)
        tl.store(out_ptr + b * N + cols, tl.rand(seed, off))

    B, N = offsets.shape
    out = torch.empty(B, N, dtype=torch.float32)
    rand_kernel[(B,)](seeds, offsets, out, N=N)
    return out


@needs_triton
def test_rand_matches_triton_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    seeds = torch.cat([torch.tensor([0, 1, 2**31 - 1, 2**32 + 5, 2**63 - 1]),
                       torch.randint(0, 2**62, (3,), generator=g)]).to(torch.int64)
    rows = torch.arange(64, dtype=torch.int32)
    words = torch.randint(0, 512, (len(seeds), 64), generator=g, dtype=torch.int32)
    offsets = (rows[None, :] * philox.WORD_STRIDE + words).to(torch.int32).contiguous()
    expected = _triton_rand(seeds, offsets)
    got = philox.rand(seeds[:, None], offsets)
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


def test_philox_known_answer():
    """Philox4x32-10 known-answer vector (Salmon et al., Random123 kat_vectors: ctr=0, key=0)."""
    z = torch.zeros(1, dtype=torch.int64)
    out = [int(x) for x in philox.philox4x32(z, z, z, z, z, z)]
    assert out == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    out = [int(x) for x in philox.philox4x32(ones, ones, ones, ones, ones, ones)]
    assert out == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_uniform_is_in_unit_interval_and_roughly_uniform():
    u = philox.rand(torch.tensor(12345), torch.arange(200_000))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    hist = np.histogram(u.numpy(), bins=10, range=(0, 1))[0] / len(u)
    assert np.abs(hist - 0.1).max() < 0.005


def test_sample_keys_are_deterministic_distinct_and_non_negative():
    ids = torch.arange(10_000)
    k = philox.derive_sample_keys(7, ids, philox.DOMAIN_DECODER)
    assert torch.equal(k, philox.derive_sample_keys(7, ids, philox.DOMAIN_DECODER))
    assert (k >= 0).all() and len(torch.unique(k)) == len(k)
    assert not torch.equal(k, philox.derive_sample_keys(7, ids, philox.DOMAIN_ENCODER))
    assert not torch.equal(k, philox.derive_sample_keys(8, ids, philox.DOMAIN_DECODER))
    with pytest.raises(ValueError, match="seed"):
        philox.derive_sample_keys(-1, ids, 1)


def test_sample_keys_change_with_the_epoch():
    ids = torch.arange(10_000)
    k0 = philox.derive_sample_keys(7, ids, philox.DOMAIN_DECODER)
    assert torch.equal(k0, philox.derive_sample_keys(7, ids, philox.DOMAIN_DECODER, 0))
    # epoch 0 is the counter (id low, id high, domain, 0)
    c0, c1, _, _ = philox.philox4x32(torch.tensor(7), torch.tensor(0), ids, torch.zeros_like(ids),
                                     torch.full_like(ids, philox.DOMAIN_DECODER), torch.zeros_like(ids))
    assert torch.equal(k0, ((c1 & 0x7FFFFFFF) << 32) | c0)
    per_epoch = [philox.derive_sample_keys(7, ids, philox.DOMAIN_DECODER, e) for e in range(4)]
    assert len(torch.unique(torch.cat(per_epoch))) == 4 * len(ids)
    # one epoch per sample gives each sample the key of its own epoch
    epochs = ids % 4
    mixed = philox.derive_sample_keys(7, ids, philox.DOMAIN_DECODER, epochs)
    assert torch.equal(mixed, torch.stack(per_epoch)[epochs, ids])
    with pytest.raises(ValueError, match="epochs"):
        philox.derive_sample_keys(7, ids, philox.DOMAIN_DECODER, -1)
    with pytest.raises(ValueError, match="epochs"):
        philox.derive_sample_keys(7, ids, philox.DOMAIN_DECODER, 1 << 32)
