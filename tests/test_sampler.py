"""Data order: a pure function of (seed, position); resume and world-size changes are exact."""
from itertools import islice

import numpy as np
import pytest

from dupmae.data_pipeline.sampler import GlobalBatchSampler, epoch_permutation


def take_steps(sampler: GlobalBatchSampler, steps: int) -> list[list[int]]:
    """`steps` optimizer steps of this rank: each step is grad_accum micro batches."""
    it = iter(sampler)
    return [sum((next(it) for _ in range(sampler.grad_accum)), []) for _ in range(steps)]


def global_order(num_samples, micro, accum, world, seed, steps, consumed=0):
    """Global batches as the union of all ranks' micro batches, in (micro step, rank) order."""
    iters = [iter(GlobalBatchSampler(num_samples, micro, accum, world, r, seed, consumed)) for r in range(world)]
    out = []
    for _ in range(steps):
        batch = []
        for _a in range(accum):
            for it in iters:
                batch.extend(next(it))
        out.append(batch)
    return out


def test_epoch_permutation_is_function_of_seed_and_epoch():
    a = epoch_permutation(1000, seed=7, epoch=3)
    assert np.array_equal(a, epoch_permutation(1000, seed=7, epoch=3))
    assert sorted(a.tolist()) == list(range(1000))
    assert not np.array_equal(a, epoch_permutation(1000, seed=7, epoch=4))
    assert not np.array_equal(a, epoch_permutation(1000, seed=8, epoch=3))


def test_each_epoch_covers_distinct_samples_and_drops_incomplete_tail():
    s = GlobalBatchSampler(num_samples=103, micro_batch=5, grad_accum=2, world_size=1, seed=1)
    assert s.steps_per_epoch == 10
    epoch0 = sum(take_steps(s, 10), [])
    assert len(epoch0) == 100 and len(set(epoch0)) == 100
    assert set(epoch0) <= set(range(103))
    expected = epoch_permutation(103, 1, 0)[:100].tolist()
    assert epoch0 == expected


def test_ranks_partition_each_global_batch():
    n, micro, accum, world = 200, 4, 3, 2
    per_rank = [take_steps(GlobalBatchSampler(n, micro, accum, world, r, seed=5), 4) for r in range(world)]
    s0 = GlobalBatchSampler(n, micro, accum, world, 0, seed=5)
    for step in range(4):
        union = per_rank[0][step] + per_rank[1][step]
        assert len(set(union)) == micro * accum * world
        assert set(union) == set(s0.global_batch_ids(step).tolist())


@pytest.mark.parametrize("resume_step", [0, 1, 7, 12, 25])
def test_resume_at_any_step_yields_exactly_the_remaining_sequence(resume_step):
    n, micro, accum, world = 97, 3, 2, 2
    g = micro * accum * world
    for rank in range(world):
        full = take_steps(GlobalBatchSampler(n, micro, accum, world, rank, seed=11), 30)
        resumed = take_steps(GlobalBatchSampler(n, micro, accum, world, rank, seed=11,
                                                consumed_samples=resume_step * g), 30 - resume_step)
        assert resumed == full[resume_step:]


def test_state_dict_round_trip_and_global_batch_guard():
    s = GlobalBatchSampler(50, micro_batch=2, grad_accum=2, world_size=2, rank=1, seed=3, consumed_samples=16)
    t = GlobalBatchSampler(50, micro_batch=2, grad_accum=2, world_size=2, rank=1, seed=0)
    t.load_state_dict(s.state_dict())
    assert list(islice(iter(t), 6)) == list(islice(iter(s), 6))
    other = GlobalBatchSampler(50, micro_batch=4, grad_accum=2, world_size=2, rank=0, seed=0)
    with pytest.raises(ValueError, match="global batch"):
        other.load_state_dict(s.state_dict())


def test_different_world_size_same_global_batch_same_global_order():
    """2 ranks x 1 accumulation step == 1 rank x 2 steps == 4 ranks x ... : same samples, same order."""
    n, seed, steps = 120, 9, 15
    two_ranks = global_order(n, micro=4, accum=1, world=2, seed=seed, steps=steps)
    one_rank = global_order(n, micro=4, accum=2, world=1, seed=seed, steps=steps)
    four_ranks = global_order(n, micro=2, accum=1, world=4, seed=seed, steps=steps)
    assert two_ranks == one_rank
    assert [sorted(b) for b in four_ranks] == [sorted(b) for b in one_rank]
    # and a job that ran 5 steps on 2 ranks continues on 1 rank exactly where it stopped
    continued = global_order(n, micro=4, accum=2, world=1, seed=seed, steps=steps - 5, consumed=5 * 8)
    assert two_ranks[:5] + continued == two_ranks


def test_invalid_configurations_are_rejected_clearly():
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        GlobalBatchSampler(10, micro_batch=4, grad_accum=2, world_size=2)
    with pytest.raises(ValueError, match="not a multiple of the global batch"):
        GlobalBatchSampler(100, micro_batch=4, consumed_samples=6)
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        GlobalBatchSampler(100, micro_batch=4, world_size=2, rank=2)
    with pytest.raises(ValueError, match="micro_batch must be positive"):
        GlobalBatchSampler(100, micro_batch=0)
