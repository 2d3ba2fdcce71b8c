"""Data order as a pure function of (seed, position); the only state is `consumed_samples`.

Every epoch is one global permutation of the sample ids, drawn from (seed, epoch). The permutation is cut
into global batches of `micro_batch * grad_accum * world_size` samples (an incomplete last batch is
dropped); global batch g of micro step a goes to ranks as

    rank r, micro step a:  batch[(a * world_size + r) * micro_batch : ... + micro_batch]

(with `tag_epoch`, each id is yielded as `epoch * num_samples + id`: fine-tuning groups and pre-training masks
depend on the epoch, see dataset.EpochSamples) so with the same global batch and micro batch, 2 ranks x 1
accumulation step and 1 rank x 2 steps see the same samples in the same order. Resuming is starting at
`consumed_samples` (a multiple of the global batch): nothing else needs saving, and the world size may change
in between.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a function of (seed, epoch) alone."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), 0x5A4D50])))
    return rng.permutation(num_samples)


@dataclass
class GlobalBatchSampler:
    """Yields this rank's micro batches (lists of sample ids) from `consumed_samples` on, forever."""

    num_samples: int
    micro_batch: int
    grad_accum: int = 1
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    consumed_samples: int = 0
    tag_epoch: bool = False  # yield epoch * num_samples + id, for items that depend on the epoch

    def __post_init__(self) -> None:
        for name in ("micro_batch", "grad_accum", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.num_samples < self.global_batch:
            raise ValueError(f"{self.num_samples} samples cannot fill one global batch of {self.global_batch} "
                             f"(micro_batch {self.micro_batch} x grad_accum {self.grad_accum} x world {self.world_size})")
        if self.consumed_samples % self.global_batch:
            raise ValueError(f"consumed_samples {self.consumed_samples} is not a multiple of the global batch "
                             f"{self.global_batch}: the global batch size changed since it was saved")

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def position(self, consumed_samples: int) -> tuple[int, int]:
        """(epoch, global batch within the epoch) that `consumed_samples` points at."""
        step = consumed_samples // self.global_batch
        return divmod(step, self.steps_per_epoch)

    def global_batch_ids(self, step: int) -> np.ndarray:
        """All sample ids of global step `step` (counted from the start of training)."""
        epoch, g = divmod(step, self.steps_per_epoch)
        perm = epoch_permutation(self.num_samples, self.seed, epoch)
        return perm[g * self.global_batch : (g + 1) * self.global_batch]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, g = self.position(self.consumed_samples)
        m, w, r = self.micro_batch, self.world_size, self.rank
        while True:
            perm = epoch_permutation(self.num_samples, self.seed, epoch)
            for gb in range(g, self.steps_per_epoch):
                batch = perm[gb * self.global_batch : (gb + 1) * self.global_batch]
                if self.tag_epoch:
                    batch = batch + epoch * self.num_samples
                for a in range(self.grad_accum):
                    start = (a * w + r) * m
                    yield batch[start : start + m].tolist()
            epoch, g = epoch + 1, 0

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if state["global_batch"] != self.global_batch:
            raise ValueError(f"checkpoint global batch {state['global_batch']} != configured {self.global_batch}: "
                             "the data order would change")
        self.seed = state["seed"]
        self.consumed_samples = state["consumed_samples"]
        self.__post_init__()
