"""Memmapped datasets over prepared folders: zero-copy reads, memory constant in corpus size.

`PackedDataset` serves the samples of one folder in shard order. `BlendedDataset` mixes several folders
with weights through a deterministic interleaving: position i of the blend is a fixed (folder, sample)
pair, so the blend's index is the "sample id" that masks and data order are functions of.
`EpochSamples` serves a training split as the epoch-tagging sampler addresses it: the epoch travels with each
sample to the collator, which draws new masks for a sample every epoch.

`data_files()` (each of the three) records the files a dataset opened: path -> size, mtime (ns) and the sha256
manifest.json gives for it. A training run keeps that record in every checkpoint; `changed_files` compares it
with the files a resumed run opens (size and mtime first, the sha256 only where they differ), so a shard
replaced or removed between a stop and its resume is refused rather than trained on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .inspect import load_manifest
from .shards import Shard, ShardError, sha256_file


class PackedDataset:
    """All samples of one `dupmae prepare` folder. `ds[i]` -> (i, token ids as a read-only uint16/32 view)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory)
        self.shards = [Shard.open(self.directory / s["name"]) for s in self.manifest["shards"]]
        self._files = {}
        for s, entry in zip(self.shards, self.manifest["shards"]):
            if len(s) != entry["samples"]:
                raise ShardError(f"{s.prefix}.idx: {len(s)} samples, manifest.json says {entry['samples']}")
            for suffix in ("bin", "idx"):
                path = s.prefix.with_suffix(f".{suffix}")
                st = path.stat()  # the file just opened (memmapped)
                self._files[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                          "sha256": entry.get(f"{suffix}_sha256")}
        self.cumulative = np.cumsum([0] + [len(s) for s in self.shards])
        self.vocab_hash = self.manifest["tokenizer"]["vocab_hash"]
        self.max_len = int(self.manifest["max_len"])

    def __len__(self) -> int:
        return int(self.cumulative[-1])

    def tokens(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples in {self.directory}")
        k = int(np.searchsorted(self.cumulative, i, side="right")) - 1
        return self.shards[k][i - int(self.cumulative[k])]

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        return int(i), self.tokens(int(i))

    def lengths(self) -> np.ndarray:
        return np.concatenate([np.asarray(s.lengths) for s in self.shards]) if self.shards else np.zeros(0, np.int32)

    def data_files(self) -> dict[str, dict]:
        """path -> {"size", "mtime_ns", "sha256"} of every shard file, as opened."""
        return dict(self._files)


class BlendedDataset:
    """Folders mixed by weight. Folder d contributes round(size * w_d) samples (wrapping around when it is
    smaller than that), interleaved evenly: its k-th sample sits at virtual time (k + 0.5) / w_d and the
    blend is the merge of all folders by that time (ties: lower folder index first)."""

    def __init__(self, datasets: list[PackedDataset], weights: list[float] | None = None, size: int | None = None):
        if not datasets:
            raise ValueError("no dataset to blend")
        hashes = {d.vocab_hash for d in datasets}
        if len(hashes) > 1:
            names = ", ".join(f"{d.directory} ({d.vocab_hash[:12]})" for d in datasets)
            raise ShardError(f"these folders were prepared with different tokenizers and cannot be mixed: {names}")
        weights = list(weights) if weights is not None else [float(len(d)) for d in datasets]
        if len(weights) != len(datasets):
            raise ValueError(f"{len(weights)} weights for {len(datasets)} datasets")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be non-negative and not all zero: {weights}")
        for d, w in zip(datasets, weights):
            if w > 0 and len(d) == 0:
                raise ShardError(f"{d.directory} holds no samples but has weight {w}")
        self.datasets = datasets
        self.max_len = max(d.max_len for d in datasets)
        self.vocab_hash = datasets[0].vocab_hash
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        size = int(size if size is not None else sum(len(d) for d in datasets))
        counts = np.floor(w * size).astype(np.int64)
        # hand the rounding remainder to the largest fractional parts, deterministically
        remainder = size - int(counts.sum())
        order = np.argsort(-(w * size - counts), kind="stable")
        counts[order[:remainder]] += 1
        times = [(np.arange(c) + 0.5) / w[d] for d, c in enumerate(counts) if c]
        owners = [np.full(c, d, dtype=np.int32) for d, c in enumerate(counts) if c]
        locals_ = [np.arange(c, dtype=np.int64) % len(datasets[d]) for d, c in enumerate(counts) if c]
        merge = np.argsort(np.concatenate(times), kind="stable")
        self.dataset_index = np.concatenate(owners)[merge]
        self.sample_index = np.concatenate(locals_)[merge]

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        d, j = int(self.dataset_index[i]), int(self.sample_index[i])
        return int(i), self.datasets[d].tokens(j)

    def data_files(self) -> dict[str, dict]:
        return {k: v for d in self.datasets for k, v in d.data_files().items()}


class EpochSamples:
    """The first `num_samples` samples of a dataset (the training split), addressed as a
    `GlobalBatchSampler(num_samples, ..., tag_epoch=True)` yields them: key `epoch * num_samples + i` ->
    `(i, token ids, epoch)`, so the collator's masks are those of (seed, epoch, i)."""

    def __init__(self, dataset, num_samples: int):
        if not 0 < num_samples <= len(dataset):
            raise ValueError(f"a training split of {num_samples} samples out of {len(dataset)}")
        self.dataset = dataset
        self.num_samples = int(num_samples)
        self.max_len = dataset.max_len

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, key: int) -> tuple[int, np.ndarray, int]:
        if key < 0:
            raise IndexError(f"sample key {key} is negative")
        epoch, i = divmod(int(key), self.num_samples)
        sample_id, tokens = self.dataset[i]
        return sample_id, tokens, epoch

    def data_files(self) -> dict[str, dict]:
        return self.dataset.data_files()


def changed_files(recorded: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """How the files of `current` (`data_files()` now) differ from `recorded` (`data_files()` when a checkpoint
    was saved), one line per file naming it; [] when they are the same data. A file whose size and mtime are
    unchanged is taken as unchanged; one whose size differs, or whose manifest gives another sha256, has
    changed; one with a new mtime only is hashed and compared with the recorded sha256 (a copy or a touch
    passes, new content does not)."""
    problems = []
    for path, was in sorted(recorded.items()):
        now = current.get(path)
        if now is None:
            problems.append(f"{path}: removed" if not Path(path).exists() else
                            f"{path}: no longer in its folder's manifest.json")
        elif now["size"] != was["size"]:
            problems.append(f"{path}: {now['size']:,} bytes, {was['size']:,} when the checkpoint was saved")
        elif now.get("sha256") != was.get("sha256"):
            problems.append(f"{path}: manifest.json gives another sha256 than when the checkpoint was saved "
                            "(the folder was prepared again)")
        elif now["mtime_ns"] != was["mtime_ns"]:
            if was.get("sha256") is None:
                problems.append(f"{path}: modified since the checkpoint was saved, and manifest.json records no "
                                "sha256 to compare")
            elif sha256_file(path) != was["sha256"]:
                problems.append(f"{path}: content replaced since the checkpoint was saved (same size, sha256 "
                                "differs)")
    problems += [f"{path}: new, not part of the data the checkpoint was trained on"
                 for path in sorted(set(current) - set(recorded))]
    return problems


def open_datasets(directories: list[str | Path], weights: list[float] | None = None):
    """One folder -> PackedDataset; several -> BlendedDataset (weights default to their sizes)."""
    sets = [PackedDataset(d) for d in directories]
    if len(sets) == 1 and weights is None:
        return sets[0]
    return BlendedDataset(sets, weights)
