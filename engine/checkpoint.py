"""Checkpoints: DeepSpeed saves on all ranks, a pointer that moves only after a complete save, retention.

Layout in RUN_DIR/checkpoints:
    step200/                   DeepSpeed's files (model and ZeRO optimizer shards) for tag "step200"
    step200/rng_rank{r}.pt     rank r's torch / CUDA / numpy / python RNG states (DeepSpeed saves none)
    step200/dupmae_complete.json   written by rank 0 after every rank finished: the save is complete
    latest_complete            the tag of the newest complete checkpoint, replaced atomically
A save killed halfway leaves a tag folder without the marker; the pointer still names the previous
complete checkpoint, and the broken folder is removed at the next successful save.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import distributed

POINTER = "latest_complete"
MARKER = "dupmae_complete.json"
_TAG = re.compile(r"^step(\d+)$")
_ANY = re.compile(r"^step(\d+)(_universal)?$")


def tag_for(step: int) -> str:
    return f"step{step}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for p in ckpt_dir.iterdir():
        m = _TAG.match(p.name)
        if m and (p / MARKER).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_complete(ckpt_dir: str | Path) -> tuple[str, dict] | None:
    """(tag, marker) of the newest complete checkpoint, or None."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / POINTER
    if pointer.is_file():
        tag = pointer.read_text(encoding="utf-8").strip()
        if (ckpt_dir / tag / MARKER).is_file():
            return tag, json.loads((ckpt_dir / tag / MARKER).read_text(encoding="utf-8"))
    steps = complete_steps(ckpt_dir)
    if not steps:
        return None
    tag = tag_for(steps[-1])
    return tag, json.loads((ckpt_dir / tag / MARKER).read_text(encoding="utf-8"))


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep_last: int, keep_every: int) -> str:
    """Collective: every rank calls it. Returns the tag."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    rank = engine.global_rank
    state = dict(client_state)
    state[UNIVERSAL_CHECKPOINT_INFO] = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    if rank == 0 and (ckpt_dir / tag / MARKER).exists():
        (ckpt_dir / tag / MARKER).unlink()  # re-saving a tag: it is incomplete until this save ends
    distributed.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    distributed.barrier()
    if rank == 0:
        marker = {"tag": tag, "step": step, "world_size": engine.world_size, "time": time.time(),
                  **{k: client_state[k] for k in ("consumed_samples", "config_digest") if k in client_state}}
        _write_atomic(ckpt_dir / tag / MARKER, json.dumps(marker, indent=2))
        _write_atomic(ckpt_dir / POINTER, tag)
        prune(ckpt_dir, keep_last, keep_every, current=step)
    distributed.barrier()
    return tag


def prune(ckpt_dir: Path, keep_last: int, keep_every: int, current: int) -> None:
    """Keep the last `keep_last` complete checkpoints and every `keep_every`-th; remove the rest and any
    incomplete folder older than the current step."""
    steps = complete_steps(ckpt_dir)
    keep = set(steps[-keep_last:]) | {current}
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    for p in ckpt_dir.iterdir():
        m = _ANY.match(p.name)
        if not m or not p.is_dir():
            continue
        s = int(m.group(1))
        if s in keep and not m.group(2):
            continue
        if (p / MARKER).is_file() or s < current:
            shutil.rmtree(p, ignore_errors=True)


def to_universal(ckpt_dir: str | Path, tag: str) -> str:
    """Collective: rank 0 converts checkpoint `tag` into DeepSpeed's universal format (once), so it can be
    loaded on another number of ranks. Returns the converted tag."""
    import argparse

    ckpt_dir = Path(ckpt_dir)
    out = ckpt_dir / f"{tag}_universal"
    done = out / MARKER
    if distributed.rank() == 0 and not done.is_file():
        from deepspeed.checkpoint import ds_to_universal

        shutil.rmtree(out, ignore_errors=True)
        ds_to_universal.main(argparse.Namespace(
            input_folder=str(ckpt_dir / tag), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=False))
        _write_atomic(done, json.dumps({"converted_from": tag, "time": time.time()}))
    distributed.barrier()
    return out.name


def load(engine, ckpt_dir: str | Path, tag: str, rng_tag: str | None = None) -> dict:
    """Load model, optimizer, scheduler and this rank's RNG; returns the client state. `rng_tag` names the
    checkpoint holding the RNG files when `tag` is a converted (universal) copy."""
    ckpt_dir = Path(ckpt_dir)
    load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True,
                                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng_file = ckpt_dir / (rng_tag or tag) / f"rng_rank{engine.global_rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}
