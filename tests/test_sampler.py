"""Data order: a pure function of (seed, position); resume and world-size changes are exact."""
from itertools import islice

import numpy as np
import pytest
import torch

from dupmae.data_pipeline.collator import DupMAECollator
from dupmae.data_pipeline.dataset import EpochSamples, PackedDataset
from dupmae.data_pipeline.sampler import GlobalBatchSampler, epoch_permutation
from dupmae.data_pipeline.tokenizer import tokenizer_info


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


# -- pre-training's input stream: epoch-tagged ids -> EpochSamples -> collator --------------------------------

def test_epoch_samples_split_tagged_keys(prepared_wordnet):
    ds = PackedDataset(prepared_wordnet)
    n_train = len(ds) - 40
    samples = EpochSamples(ds, n_train)
    assert len(samples) == n_train and samples.max_len == ds.max_len
    for key, (epoch, i) in ((5, (0, 5)), (n_train + 5, (1, 5)), (3 * n_train + n_train - 1, (3, n_train - 1))):
        sid, toks, got_epoch = samples[key]
        assert (sid, got_epoch) == (i, epoch) and np.array_equal(toks, ds[i][1])
    with pytest.raises(IndexError):
        samples[-1]
    with pytest.raises(ValueError, match="training split"):
        EpochSamples(ds, len(ds) + 1)


def test_resumed_pretraining_stream_collates_the_same_masks(prepared_wordnet):
    """The pre-training input as the trainer builds it (the epoch-tagging sampler, EpochSamples, the collator in a
    DataLoader): resumed mid-epoch from the sampler's saved state, every rank collates exactly the batches of the
    uninterrupted run, masks included; a sample seen again in the next epoch gets new masks."""
    ds = PackedDataset(prepared_wordnet)
    n_train = len(ds) - 40
    samples = EpochSamples(ds, n_train)
    collator = DupMAECollator(tokenizer_info(str(prepared_wordnet / "tokenizer")), seed=13, max_len=ds.max_len,
                              pad_to_multiple_of=8)
    micro, accum, world = 4, 2, 2

    def sampler(rank):
        return GlobalBatchSampler(n_train, micro, accum, world, rank, seed=13, tag_epoch=True)

    def stream(s, steps):
        loader = torch.utils.data.DataLoader(samples, batch_sampler=s, collate_fn=collator)
        return list(islice(loader, steps * accum))

    per_epoch = sampler(0).steps_per_epoch
    total, resume = 2 * per_epoch + 3, per_epoch + per_epoch // 2  # resumed in the middle of epoch 1
    for rank in range(world):
        full = stream(sampler(rank), total)
        saved = sampler(rank)
        saved.consumed_samples = resume * saved.global_batch  # what the trainer's checkpoint records
        restored = GlobalBatchSampler(n_train, micro, accum, world, rank, seed=0, tag_epoch=True)
        restored.load_state_dict(saved.state_dict())
        resumed = stream(restored, total - resume)
        assert len(resumed) == len(full[resume * accum :])
        for a, b in zip(full[resume * accum :], resumed):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), key
        for k, batch in enumerate(full):
            assert (batch["epochs"] == (k // accum) // per_epoch).all()
            assert (batch["sample_ids"] < n_train).all()

        # the samples of this rank seen in both epoch 0 and epoch 1: new encoder masks and decoder seeds
        seen: dict[tuple[int, int], tuple] = {}
        for batch in full:
            for r in range(len(batch["sample_ids"])):
                n = int(batch["lengths"][r])
                seen[int(batch["epochs"][r]), int(batch["sample_ids"][r])] = (
                    batch["labels"][r, :n], int(batch["decoder_seeds"][r]))
        twice = [i for (e, i) in seen if e == 0 and (1, i) in seen]
        assert len(twice) > 10
        assert all(seen[0, i][1] != seen[1, i][1] for i in twice)
        same = sum(torch.equal(seen[0, i][0], seen[1, i][0]) for i in twice)
        assert same <= len(twice) // 10, (same, len(twice))


def test_pretraining_feeds_the_epoch_to_the_collator(tmp_path, tiny_recipe):
    """`dupmae pretrain`'s data: training batches carry their epoch (new masks each epoch); the held-out
    samples, read untagged by the evaluation, keep epoch 0's masks."""
    from dupmae.engine.config import load_config
    from dupmae.engine.pretrain import PretrainTask

    task = PretrainTask(load_config(tiny_recipe(tmp_path / "r.toml", tmp_path / "run", data={"eval_samples": 16})))
    task.setup_data(1, 0)
    assert task.sampler.tag_epoch and len(task.dataset) == task.n_train == task.sampler.num_samples
    s = task.sampler
    for epoch in (0, 1, 2):
        s.consumed_samples = epoch * s.steps_per_epoch * s.global_batch
        keys = next(iter(s))
        batch = task.collator([task.dataset[k] for k in keys])
        assert (batch["epochs"] == epoch).all()
        assert batch["sample_ids"].tolist() == epoch_permutation(task.n_train, s.seed, epoch)[: len(keys)].tolist()
    held_out = task.collator([task.corpus[j] for j in range(task.n_train, task.n_train + 4)])
    assert (held_out["epochs"] == 0).all() and (held_out["sample_ids"] >= task.n_train).all()
