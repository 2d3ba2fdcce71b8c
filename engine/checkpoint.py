"""Checkpoints: DeepSpeed saves on all ranks, a pointer that moves only after a complete save, retention,
a checksum of every file, and loading that never runs code from a checkpoint's pickles.

Layout in RUN_DIR/checkpoints:
    step200/                   DeepSpeed's files (model and ZeRO optimizer shards) for tag "step200"
    step200/rng_rank{r}.pt     rank r's torch / CUDA / numpy / python RNG states (DeepSpeed saves none)
    step200/dupmae_complete.json   written by rank 0 after every rank finished: the save is complete. It holds
                               the step, world size, ZeRO stage, precision, the data files the run read (size,
                               mtime, sha256: a resume refuses changed data), and the size and sha256 of every
                               file of the checkpoint ("files"), verified before a resume or an export loads it
    step200/dupmae_damaged.json    instead of the marker: a checkpoint a resume found damaged and set aside
                               (the marker it had and what was wrong); removed like an incomplete save
    latest_complete            the tag of the newest complete checkpoint, replaced atomically
A save killed halfway leaves a tag folder without the marker; the pointer still names the previous
complete checkpoint, and the broken folder is removed at the next successful save. Retention runs only after
the new marker and pointer are on disk, so it never removes an older checkpoint before the newer is complete.

A full disk (ENOSPC) or quota (EDQUOT) during a save, on any rank: that rank keeps the error, removes the file
it was writing and skips the rest of its writes, but still goes through every collective of the save (DeepSpeed's
included), so the ranks never wait on each other; at the next agreement point every rank learns which rank
failed on which file, rank 0 removes the incomplete tag folder, and all ranks raise `DiskFullError` (exit 74,
`dupmae pretrain`) naming the file and the free space. The pointer and the older checkpoints are untouched.
Checkpoint files are written through Python's `open()` during a save: torch's own writer reports a full disk as
"unexpected pos" without the cause.

Checksums: sha256 (hashlib, SHA-NI where the CPU has it: about 1.3 GB/s on one core of the EPYC here, so
about 1 s for a BERT-base checkpoint of 1.3 GB, split over the ranks when saving and when verifying).
Checkpoints saved before checksums were recorded load unverified, with a note.

Unpickling: every `torch.load` of a checkpoint (ours, and DeepSpeed's own inside `engine.load_checkpoint`,
the universal conversion and the ZeRO consolidation of `dupmae export`) runs with `weights_only=True` inside
`restricted_unpickling()`, which allows tensors, plain containers and the few types our RNG states and
DeepSpeed's optimizer state hold (`SAFE_GLOBALS`); a pickle asking for anything else is refused with
`CheckpointError` naming the file, before any of its code can run.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
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
DAMAGED = "dupmae_damaged.json"
CHECKSUM = "sha256"
_TAG = re.compile(r"^step(\d+)$")
_ANY = re.compile(r"^step(\d+)(_universal)?$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or read: names the file and what is wrong."""


class DiskFullError(RuntimeError):
    """A checkpoint could not be written for lack of space (ENOSPC) or quota (EDQUOT): names the file, the
    free space, and the complete checkpoint a rerun resumes from. Every rank raises it together."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full_cause(e: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT `OSError` behind `e` (itself, or its cause or context), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return ""


def free_space(path: str | Path) -> str:
    """'N free of M' on the filesystem holding `path` (its nearest existing parent), or '' where it cannot tell."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return ""
    return f"{_size(usage.free)} free of {_size(usage.total)}"


def tag_for(step: int) -> str:
    return f"step{step}"


# -- loading without running a pickle's code ----------------------------------------------------------

def safe_globals() -> list:
    """The types a checkpoint of ours may ask the unpickler for, beyond tensors and plain containers:
    numpy's RNG state (rng_rank*.pt) and the objects DeepSpeed puts in its optimizer state (ZeRO 1-3 with
    any precision, offload, universal copies). Found by saving each kind and listing
    `torch.serialization.get_unsafe_globals_in_checkpoint`; none of them runs code of the file's choosing."""
    import numpy as np

    reconstruct = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    allowed = [np.ndarray, np.dtype, reconstruct._reconstruct, type(np.dtype(np.uint32)),
               type(np.dtype(np.float64)), type(np.dtype(np.int64))]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # another DeepSpeed: its loads fail with a clear error naming the type instead
        return allowed
    # Some Pythons (Debian 12's 3.11.2 among them) pickle a member of an int-valued Enum by name, as
    # getattr(ZeroStageEnum, "gradients"): answered by a getattr that returns members of allowed Enums only
    return allowed + [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address,
                      (_enum_member([ZeroStageEnum]), "builtins.getattr")]


def _enum_member(enums: list):
    """getattr as a checkpoint's pickle may call it: `cls.NAME` for a member NAME of one of `enums`, else an
    UnpicklingError (so that getattr cannot reach any other attribute of any object)."""
    def getattr_member(cls, name):
        if any(cls is e for e in enums) and isinstance(name, str) and name in cls.__members__:
            return cls.__members__[name]
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL builtins.getattr ({getattr(cls, '__name__', cls)!r}, "
                                     f"{name!r}): only the members of {', '.join(e.__name__ for e in enums)}")
    return getattr_member


def _refusal(path, e: Exception) -> CheckpointError:
    text = str(e)
    start = text.find("Unsupported global: GLOBAL ")
    if start >= 0:
        name = text[start + len("Unsupported global: GLOBAL "):].split()[0]
        return CheckpointError(
            f"{path}: refused to load: its pickle asks for {name}, which no checkpoint this trainer writes holds, "
            "and loading it would call code of the file's choosing. Load only checkpoints you trust; if this one "
            "was written by this trainer with another DeepSpeed version, report the name")
    first = text.splitlines()[0] if text else ""
    return CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {first}); it is damaged or not a checkpoint")


def load_file(path, map_location="cpu"):
    """`torch.load` of one checkpoint file with `weights_only=True` and `safe_globals()`."""
    with restricted_unpickling():
        return torch.load(path, map_location=map_location)


@contextlib.contextmanager
def restricted_unpickling():
    """Within this block every `torch.load` (DeepSpeed's included, which ask for `weights_only=False`)
    unpickles with `weights_only=True` and only `safe_globals()` allowed; a refusal or an unreadable file is a
    `CheckpointError` naming the file. Single-threaded use only: it replaces `torch.load` for the block."""
    original = torch.load
    allowed = safe_globals()

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise _refusal(f, e) from None
        except (RuntimeError, EOFError, ValueError) as e:  # a truncated or damaged zip archive or pickle
            raise _refusal(f, e) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


# -- checksums --------------------------------------------------------------------------------------------

def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, CHECKSUM).hexdigest()


def _checkpoint_files(folder: Path) -> list[str]:
    """The files a save wrote (relative names, sorted): everything but the marker and temporary files."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name not in (MARKER, DAMAGED) and not p.name.endswith(".tmp"))


def _my_share(sizes: dict[str, int]) -> list[str]:
    """This rank's files to hash: largest first, each to the least loaded rank (the same split on every rank)."""
    world, me = distributed.world_size(), distributed.rank()
    load, mine = [0] * world, []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = load.index(min(load))
        load[r] += sizes[name]
        if r == me:
            mine.append(name)
    return mine


def checksum_files(folder: Path) -> dict[str, dict]:
    """Collective: {name: {"size", "sha256"}} of every file in `folder`, the hashing split over the ranks."""
    sizes = {n: (folder / n).stat().st_size for n in _checkpoint_files(folder)}
    mine = {n: {"size": sizes[n], CHECKSUM: file_digest(folder / n)} for n in _my_share(sizes)}
    merged: dict[str, dict] = {}
    for part in distributed.gather_objects(mine):
        merged.update(part)
    return dict(sorted(merged.items()))


def verify(ckpt_dir: str | Path, tag: str, marker: dict) -> list[str] | None:
    """Collective: every problem found (each naming its file), [] when each file matches the size and checksum
    its marker recorded, None when the marker recorded none (saved before checksums were kept)."""
    folder = Path(ckpt_dir) / tag
    files = marker.get("files")
    if files is None:
        return None
    problems = []
    for name in _my_share({n: int(r["size"]) for n, r in files.items()}):
        path, want = folder / name, files[name]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{path}: {size:,} bytes, {want['size']:,} when saved (truncated or overwritten)")
        elif file_digest(path) != want[CHECKSUM]:
            problems.append(f"{path}: {CHECKSUM} differs from the one recorded when it was saved (damaged)")
    return sorted(p for part in distributed.gather_objects(problems) for p in part)


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
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:  # a failed write or flush names no file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
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


def read_marker(ckpt_dir: Path, tag: str) -> dict:
    path = ckpt_dir / tag / MARKER
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e}); the checkpoint's completion marker is damaged") from e


def complete_checkpoints(ckpt_dir: str | Path) -> list[str]:
    """Tags of the complete checkpoints, the one to resume from first: the pointer's, then the others by
    step, newest first."""
    ckpt_dir = Path(ckpt_dir)
    tags = [tag_for(s) for s in reversed(complete_steps(ckpt_dir))]
    pointer = ckpt_dir / POINTER
    if pointer.is_file():
        tag = pointer.read_text(encoding="utf-8").strip()
        if tag in tags:
            tags.remove(tag)
            tags.insert(0, tag)
    return tags


def latest_complete(ckpt_dir: str | Path) -> tuple[str, dict] | None:
    """(tag, marker) of the newest complete checkpoint, or None."""
    ckpt_dir = Path(ckpt_dir)
    tags = complete_checkpoints(ckpt_dir)
    return (tags[0], read_marker(ckpt_dir, tags[0])) if tags else None


def set_pointer(ckpt_dir: str | Path, tag: str) -> None:
    """Rank 0: `latest_complete` names `tag` (a complete checkpoint)."""
    if distributed.rank() == 0:
        _write_atomic(Path(ckpt_dir) / POINTER, tag)


def set_aside(ckpt_dir: str | Path, tag: str, problems: list[str]) -> None:
    """Rank 0: checkpoint `tag` is damaged: its marker becomes `dupmae_damaged.json` (with the problems), so it
    is no longer complete, never a resume point again, and removed like an incomplete save."""
    folder = Path(ckpt_dir) / tag
    if distributed.rank() == 0 and (folder / MARKER).is_file():
        try:
            old = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None  # the marker itself is what is damaged
        record = {"marker": old, "problems": problems, "time": time.time()}
        _write_atomic(folder / DAMAGED, json.dumps(record, indent=2))
        (folder / MARKER).unlink()
    distributed.barrier()


def saved_setup(ckpt_dir: str | Path, tag: str, marker: dict) -> tuple[int | str, str | None]:
    """(ZeRO stage, precision) a checkpoint was saved with. A marker written before they were recorded: what
    the file names tell (stage 0, "1 or 2", 3; bf16 for ZeRO 1-3 only), None where they cannot."""
    if "zero_stage" in marker:
        return int(marker["zero_stage"]), marker.get("precision")
    names = [p.name for p in (Path(ckpt_dir) / tag).iterdir()]
    optim = [n for n in names if n.endswith("_optim_states.pt")]
    if any(re.fullmatch(r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt", n) for n in names):
        stage: int | str = 3
    elif optim:
        stage = "1 or 2"
    else:
        stage = 0
    precision = ("bf16" if any(n.startswith("bf16_") for n in optim) else None) if optim else None
    return stage, precision


class _DiskGuard:
    """This rank's writes during one save: the first that fails for lack of space is kept (`error`, with the
    file it was writing), and every later write of the save is skipped, so the rank still takes part in each
    collective of the save. Any other error propagates as before."""

    def __init__(self):
        self.error: OSError | None = None

    def call(self, fn, *args, **kwargs):
        if self.error is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - only a full disk is kept; anything else is raised again
            cause = disk_full_cause(e)
            if cause is None:
                raise
            self.error = cause
            return None

    @contextlib.contextmanager
    def writes(self, engine):
        """Within this block `torch.save` to a path (DeepSpeed's included) writes through Python's `open()`,
        so a full disk is an `OSError` naming the file (torch's own writer reports it as "unexpected pos"),
        removes the partial file, and is kept instead of raised; so is DeepSpeed's copy of its recovery script."""
        original_save = torch.save
        guard = self

        def save(obj, f, *args, **kwargs):
            if not isinstance(f, (str, os.PathLike)):
                return guard.call(original_save, obj, f, *args, **kwargs)

            def write():
                try:
                    with open(f, "wb") as fh:
                        original_save(obj, fh, *args, **kwargs)
                except Exception as e:
                    cause = disk_full_cause(e)
                    if cause is None:
                        raise
                    with contextlib.suppress(OSError):
                        os.unlink(f)  # the partial file: never read, and its space is given back
                    raise OSError(cause.errno, os.strerror(cause.errno), os.fspath(f)) from e

            return guard.call(write)

        copy_script = getattr(engine, "_copy_recovery_script", None)
        torch.save = save
        if copy_script is not None:
            engine._copy_recovery_script = lambda *a, **k: guard.call(copy_script, *a, **k)
        try:
            yield
        finally:
            torch.save = original_save
            if copy_script is not None:
                del engine._copy_recovery_script


def _stop_if_disk_full(guard: _DiskGuard, ckpt_dir: Path, tag: str) -> None:
    """Collective, in place of a barrier: when any rank's write failed for lack of space, rank 0 removes the
    incomplete folder and every rank raises `DiskFullError` naming the rank, the file and the free space."""
    mine = None
    if guard.error is not None:
        e = guard.error
        mine = f"{e.filename or ckpt_dir / tag}: [Errno {e.errno}] {e.strerror or os.strerror(e.errno)}"
    failures = [(r, f) for r, f in enumerate(distributed.gather_objects(mine)) if f]
    if not failures:
        return
    folder = ckpt_dir / tag
    if distributed.rank() == 0:
        (folder / MARKER).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
    distributed.barrier()
    where = "; ".join(f"rank {r}: {f}" if distributed.world_size() > 1 else f for r, f in failures)
    free = free_space(ckpt_dir)
    previous = complete_checkpoints(ckpt_dir)
    if previous:
        size = ""
        with contextlib.suppress(CheckpointError, KeyError, TypeError, ValueError):
            files = read_marker(ckpt_dir, previous[0]).get("files") or {}
            if files:
                size = f" (a checkpoint of this run takes {_size(sum(int(r['size']) for r in files.values()))})"
        resume = (f"{ckpt_dir / POINTER} still names {previous[0]}, the last complete checkpoint{size}: free space "
                  f"(or move train.run_dir to a larger disk), then run the same command again to resume from it")
    else:
        resume = ("no complete checkpoint exists yet: free space (or move train.run_dir to a larger disk), then run "
                  "the same command again; it starts from step 0")
    raise DiskFullError(f"disk full: checkpoint {folder} could not be written: {where}. {free or 'free space unknown'} "
                        f"on the filesystem of {ckpt_dir} now (the incomplete {tag} removed). {resume}")


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep_last: int, keep_every: int,
         marker_extra: dict | None = None) -> str:
    """Collective: every rank calls it. Returns the tag. `marker_extra`: more fields for the marker.
    A full disk or quota on any rank: `DiskFullError` on every rank, nothing of this save left, the pointer and
    older checkpoints as they were."""
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
    folder = ckpt_dir / tag
    guard = _DiskGuard()
    if rank == 0:
        if folder.exists():
            # an incomplete or damaged leftover, or an older save of this step: the marker goes first (the folder
            # is no resume point from then on), then every file, so no stale file of it mixes with this save's
            (folder / MARKER).unlink(missing_ok=True)
            shutil.rmtree(folder)
        guard.call(folder.mkdir, parents=True, exist_ok=True)
    _stop_if_disk_full(guard, ckpt_dir, tag)
    with guard.writes(engine):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
        torch.save(rng_state(), folder / f"rng_rank{rank}.pt")
    _stop_if_disk_full(guard, ckpt_dir, tag)
    files = checksum_files(folder)
    if rank == 0:
        marker = {"tag": tag, "step": step, "world_size": engine.world_size, "time": time.time(),
                  **{k: client_state[k] for k in ("consumed_samples", "config_digest") if k in client_state},
                  **(marker_extra or {}), "checksum": CHECKSUM, "files": files}
        guard.call(_write_atomic, folder / MARKER, json.dumps(marker, indent=2))
        guard.call(_write_atomic, ckpt_dir / POINTER, tag)
    _stop_if_disk_full(guard, ckpt_dir, tag)  # a marker without its pointer is removed with the folder
    if rank == 0:
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
            # the marker first: a removal cut short (killed, a disk error) leaves an incomplete folder, which is
            # never a resume point and is removed at the next save, not a "complete" one with files missing
            (p / MARKER).unlink(missing_ok=True)
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
        with restricted_unpickling():
            ds_to_universal.main(argparse.Namespace(
                input_folder=str(ckpt_dir / tag), output_folder=str(out), num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False))
        _write_atomic(done, json.dumps({"converted_from": tag, "time": time.time()}))
    distributed.barrier()
    return out.name


def load(engine, ckpt_dir: str | Path, tag: str, rng_tag: str | None = None) -> dict:
    """Load model, optimizer, scheduler and this rank's RNG; returns the client state. `rng_tag` names the
    checkpoint holding the RNG files when `tag` is a converted (universal) copy. Every file is unpickled with
    `weights_only=True` (`restricted_unpickling`), DeepSpeed's too."""
    ckpt_dir = Path(ckpt_dir)
    with restricted_unpickling():
        load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True,
                                                         load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng_file = ckpt_dir / (rng_tag or tag) / f"rng_rank{engine.global_rank}.pt"
    if rng_file.is_file():
        set_rng_state(load_file(rng_file))
    return client_state or {}
