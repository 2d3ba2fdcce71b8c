"""Faults a long pre-training run must survive, injected into real one-rank runs in this process (issue 14):
a damaged checkpoint (a flipped byte, a truncated file), a save that fails halfway, a disk that fills during a
save (a small tmpfs; one rank here, two ranks under the deepspeed launcher), data changed between a stop and its
resume, a checkpoint whose pickle would run code, and a resume with another ZeRO stage."""
from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import subprocess

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from test_trainer import one_rank, one_rank_env, read_metrics  # noqa: F401  (one_rank is a fixture)

from dupmae.data_pipeline.dataset import PackedDataset, changed_files
from dupmae.data_pipeline.shards import Shard, write_shard
from dupmae.engine import checkpoint, trainer
from dupmae.engine.checkpoint import MARKER, CheckpointError
from dupmae.engine.cli import main as cli_main
from dupmae.engine.config import ConfigError, load_config
from dupmae.engine.export import ExportError, export


def _run(monkeypatch, recipe: Path, *overrides: str) -> int:
    """One in-process run of `recipe`, as a fresh `dupmae pretrain` process would start it."""
    import deepspeed.utils.groups

    one_rank_env(monkeypatch)
    monkeypatch.setattr(deepspeed.utils.groups, "_WORLD_GROUP", None)
    return trainer.run(load_config(recipe, list(overrides)))


def _cli(monkeypatch, recipe: Path, *overrides: str) -> int:
    import deepspeed.utils.groups

    one_rank_env(monkeypatch)
    monkeypatch.setattr(deepspeed.utils.groups, "_WORLD_GROUP", None)
    return cli_main(["pretrain", "--config", str(recipe), *overrides])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


class Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a hostile checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


# -- A: damaged checkpoints ---------------------------------------------------------------------------------

def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_recipe, one_rank, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.toml", run_dir, dropout=False, zero={"stage": 1},
                         train={"max_steps": 6, "stop_at_step": 4}, checkpoint={"every": 2, "keep_last": 2})
    assert _run(monkeypatch, recipe) == 0
    ckpt = run_dir / "checkpoints"
    marker = json.loads((ckpt / "step4" / MARKER).read_text())
    assert marker["checksum"] == "sha256" and marker["zero_stage"] == 1 and marker["precision"] == "fp32"
    names = sorted(p.name for p in (ckpt / "step4").iterdir() if p.name != MARKER)
    assert sorted(marker["files"]) == names and len(names) == 3  # model states, optimizer shard, RNG
    assert all(marker["files"][n]["size"] == (ckpt / "step4" / n).stat().st_size for n in names)
    first = dict(_losses(run_dir))

    damaged = ckpt / "step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _flip_byte(damaged)
    capsys.readouterr()
    assert _run(monkeypatch, recipe, "train.stop_at_step=0") == 0
    err = capsys.readouterr().err
    assert f"[warning] {ckpt / 'step4'} is damaged: {damaged}: sha256 differs" in err
    assert f"falling back to {ckpt / 'step2'}" in err and f"resumed from {ckpt / 'step2'}: step 2" in err
    # the fallback resumed exactly: steps 3 and 4 again give the losses they gave before
    again = _losses(run_dir)[4:]
    assert [s for s, _ in again] == [3, 4, 5, 6]
    assert again[0][1] == first[3] and again[1][1] == first[4]
    # step 4 was saved anew (the damaged copy replaced), and every checkpoint left verifies
    assert (ckpt / "latest_complete").read_text() == "step6"
    assert checkpoint.complete_steps(ckpt) == [4, 6]
    for tag in ("step4", "step6"):
        assert checkpoint.verify(ckpt, tag, checkpoint.read_marker(ckpt, tag)) == []


def test_damaged_checkpoint_with_none_to_fall_back_to_stops_and_export_refuses_it(tmp_path, tiny_recipe, one_rank,
                                                                                  monkeypatch, capsys):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.toml", run_dir, dropout=False, zero={"stage": 0},
                         train={"max_steps": 4, "stop_at_step": 2}, checkpoint={"every": 1, "keep_last": 1})
    assert _run(monkeypatch, recipe) == 0
    ckpt = run_dir / "checkpoints"
    assert checkpoint.complete_steps(ckpt) == [2]  # keep_last 1: step 1 went when step 2 was complete
    truncated = ckpt / "step2" / "mp_rank_00_model_states.pt"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    before = {p.name: p.stat().st_mtime_ns for p in (ckpt / "step2").iterdir()}

    capsys.readouterr()
    assert _cli(monkeypatch, recipe, "train.stop_at_step=0") == 2
    err = capsys.readouterr().err
    assert f"{ckpt / 'step2'} is damaged: {truncated}: 1,000 bytes" in err and "No older complete checkpoint" in err
    # nothing was changed: the user can put the file back and run again
    assert {p.name: p.stat().st_mtime_ns for p in (ckpt / "step2").iterdir()} == before
    assert (ckpt / "latest_complete").read_text() == "step2" and not read_metrics(run_dir)[2:]

    with pytest.raises(ExportError, match=f"step2 is damaged, not exported: {truncated}: 1,000 bytes"):
        export(run_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()


def test_checkpoint_saved_without_checksums_loads_with_a_note(tmp_path, tiny_recipe, one_rank, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.toml", run_dir, dropout=False, train={"max_steps": 3, "stop_at_step": 2})
    assert _run(monkeypatch, recipe) == 0
    path = run_dir / "checkpoints" / "step2" / MARKER
    old = {k: v for k, v in json.loads(path.read_text()).items()
           if k not in ("checksum", "files", "zero_stage", "precision", "data_files")}
    path.write_text(json.dumps(old))
    capsys.readouterr()
    assert _run(monkeypatch, recipe, "train.stop_at_step=0") == 0
    err = capsys.readouterr().err
    assert "records no checksums (saved by an older version): loading it unverified" in err
    assert "resumed from" in err and [s for s, _ in _losses(run_dir)] == [1, 2, 3]


def test_a_failed_save_leaves_the_previous_checkpoint_complete(tmp_path, tiny_recipe, one_rank, monkeypatch, capsys):
    """keep_last 1: the older checkpoint goes only once the newer one is complete."""
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.toml", run_dir, dropout=False, train={"max_steps": 4, "stop_at_step": 2},
                         checkpoint={"every": 1000, "keep_last": 1})
    assert _run(monkeypatch, recipe) == 0
    ckpt = run_dir / "checkpoints"

    def disk_full():
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # DeepSpeed has written step 4's files when the RNG file cannot be
        m.setattr(checkpoint, "rng_state", disk_full)
        with pytest.raises(OSError, match="No space left"):
            _run(monkeypatch, recipe, "train.stop_at_step=0")
    assert (ckpt / "step4").is_dir() and not (ckpt / "step4" / MARKER).exists()
    assert checkpoint.complete_steps(ckpt) == [2] and (ckpt / "latest_complete").read_text() == "step2"

    capsys.readouterr()
    assert _run(monkeypatch, recipe, "train.stop_at_step=0") == 0
    assert f"resumed from {ckpt / 'step2'}: step 2" in capsys.readouterr().err
    assert checkpoint.complete_steps(ckpt) == [4] and not (ckpt / "step2").exists()
    # a run resumed at its last step saves nothing again (the checkpoint never becomes incomplete)
    stamp = (ckpt / "step4" / MARKER).stat().st_mtime_ns
    assert _run(monkeypatch, recipe) == 0
    assert "already holds step 4" in capsys.readouterr().err
    assert (ckpt / "step4" / MARKER).stat().st_mtime_ns == stamp


# -- A2: the disk fills during a save ------------------------------------------------------------------------

class SmallDisk:
    """A tmpfs of `size` mounted at `path` (root only); `resize` changes its size in place (frees space)."""

    def __init__(self, path: Path, size: str):
        if os.geteuid() != 0:
            pytest.skip("a full disk is injected with a small tmpfs, which only root can mount")
        path.mkdir(parents=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs at {path}: {done.stderr.strip()}")
        self.path = path

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "--lazy", str(self.path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    disks = []

    def mount(size: str) -> SmallDisk:
        disks.append(SmallDisk(tmp_path / f"disk{len(disks)}", size))
        return disks[-1]

    yield mount
    for disk in disks:
        disk.unmount()


# a checkpoint of the tiny model with ZeRO-1 on one rank: 4.2 MB of model states, 12.4 MB of optimizer states,
# 14 KB of RNG; 24 MB holds one checkpoint and the run's logs, and the next save fills it in its second file
DISK_FOR_ONE_CHECKPOINT = "24m"


def test_disk_full_during_a_save_stops_74_and_the_same_command_resumes(tmp_path, tiny_recipe, one_rank, monkeypatch,
                                                                        capsys, small_disk):
    """The run directory on a 24 MB tmpfs, a checkpoint every 2 steps, keep_last 1: step 2's checkpoint fits,
    step 4's fills the disk halfway through its optimizer file. The run stops with exit 74 and a message naming
    the file and the free space; step 2 stays complete, verified and named by latest_complete; nothing of step 4
    is left. After the disk grows, the same command resumes from step 2 and gives the uninterrupted losses."""
    sections = dict(zero={"stage": 1}, train={"max_steps": 6}, checkpoint={"every": 2, "keep_last": 1},
                    logging={"every": 1, "tensorboard": False})
    whole = tmp_path / "whole"
    assert _run(monkeypatch, tiny_recipe(tmp_path / "whole.toml", whole, **sections)) == 0
    disk = small_disk(DISK_FOR_ONE_CHECKPOINT)
    run_dir = disk.path / "run"
    recipe = tiny_recipe(tmp_path / "r.toml", run_dir, **sections)
    ckpt = run_dir / "checkpoints"

    capsys.readouterr()
    assert _cli(monkeypatch, recipe) == trainer.EXIT_DISK_FULL == 74
    err = capsys.readouterr().err
    failed = ckpt / "step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert (f"dupmae pretrain: error: disk full: checkpoint {ckpt / 'step4'} could not be written: {failed}: "
            "[Errno 28] No space left on device.") in err, err[-3000:]
    assert "MB free of 25.2 MB on the filesystem of" in err and "(the incomplete step4 removed)" in err
    assert f"{ckpt / 'latest_complete'} still names step2, the last complete checkpoint" in err
    assert "run the same command again" in err
    # the previous checkpoint is the resume point, whole (retention did not touch it); nothing of step 4 is left
    assert (ckpt / "latest_complete").read_text() == "step2"
    assert checkpoint.complete_checkpoints(ckpt) == ["step2"]
    assert checkpoint.verify(ckpt, "step2", checkpoint.read_marker(ckpt, "step2")) == []
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step2"]
    assert not list(ckpt.rglob("*.tmp"))
    assert [s for s, _ in _losses(run_dir)] == [1, 2, 3, 4]

    disk.resize("64m")
    capsys.readouterr()
    assert _cli(monkeypatch, recipe) == 0
    assert f"resumed from {ckpt / 'step2'}: step 2" in capsys.readouterr().err
    again = _losses(run_dir)[4:]
    assert [s for s, _ in again] == [3, 4, 5, 6]
    assert again == _losses(whole)[2:]  # bit-exact: dropout on, RNG restored
    assert checkpoint.complete_checkpoints(ckpt) == ["step6"] and (ckpt / "latest_complete").read_text() == "step6"


def test_quota_exceeded_writing_the_marker_stops_74(tmp_path, tiny_recipe, one_rank, monkeypatch, capsys):
    """EDQUOT from the completion marker's JSON write (the last write of a save): the same clean stop, the
    marker-less folder removed, the pointer unchanged."""
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.toml", run_dir, dropout=False, train={"max_steps": 4},
                         checkpoint={"every": 2, "keep_last": 1})
    ckpt = run_dir / "checkpoints"
    original = checkpoint._write_atomic

    def write(path, text):
        if path == ckpt / "step4" / MARKER:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(path))
        return original(path, text)

    monkeypatch.setattr(checkpoint, "_write_atomic", write)
    capsys.readouterr()
    assert _cli(monkeypatch, recipe) == 74
    err = capsys.readouterr().err
    assert (f"disk full: checkpoint {ckpt / 'step4'} could not be written: {ckpt / 'step4' / MARKER}: "
            f"[Errno {errno.EDQUOT}] Disk quota exceeded") in err, err[-3000:]
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step2"]
    assert (ckpt / "latest_complete").read_text() == "step2" and not list(ckpt.rglob("*.tmp"))

def test_a_stop_signal_during_a_save_does_not_save_that_step_again(tmp_path, tiny_recipe, one_rank, monkeypatch,
                                                                 capsys):
    """SIGUSR1 while the periodic checkpoint of step 2 is being written: the run stops
    at the next step boundary, which is step 2, without saving step 2 a second time. Saving it again removed
    the complete checkpoint first, so with keep_last 1 no complete checkpoint existed until the new save ended
    (a job killed then, say at the end of Slurm's grace period, started over from step 0), and the stop took
    two saves instead of none."""
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.toml", run_dir, dropout=False, train={"max_steps": 6},
                         checkpoint={"every": 2, "keep_last": 1})
    saved_steps = []
    original = checkpoint.save

    def save_then_signal(engine, ckpt_dir, step, *args, **kwargs):
        tag = original(engine, ckpt_dir, step, *args, **kwargs)
        saved_steps.append(step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # the trainer's handler only sets its flag
        return tag

    monkeypatch.setattr(checkpoint, "save", save_then_signal)
    capsys.readouterr()
    assert _run(monkeypatch, recipe) == trainer.EXIT_PREEMPTED
    err = capsys.readouterr().err
    assert "stop requested by signal at step 2: saving" in err and "already holds step 2" in err
    assert saved_steps == [2]
    ckpt = run_dir / "checkpoints"
    assert checkpoint.complete_steps(ckpt) == [2] and (ckpt / "latest_complete").read_text() == "step2"
    assert [s for s, _ in _losses(run_dir)] == [1, 2]


# -- B: data changed between a stop and its resume -----------------------------------------------------------

def test_changed_files_compares_size_mtime_then_checksum(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)  # mtimes kept
    rec = PackedDataset(shards).data_files()
    bin_, idx = str(shards / "shard-00000.bin"), str(shards / "shard-00000.idx")
    assert sorted(rec) == [bin_, idx] and changed_files(rec, PackedDataset(shards).data_files()) == []

    os.utime(bin_, ns=(rec[bin_]["mtime_ns"] + 10**9,) * 2)  # touched, same bytes: hashed, accepted
    assert changed_files(rec, PackedDataset(shards).data_files()) == []
    _flip_byte(Path(bin_))  # same size, new bytes
    assert changed_files(rec, PackedDataset(shards).data_files()) == [
        f"{bin_}: content replaced since the checkpoint was saved (same size, sha256 differs)"]

    now = dict(rec)
    now[idx] = dict(rec[idx], size=rec[idx]["size"] + 8)
    assert changed_files(rec, now) == [f"{idx}: {rec[idx]['size'] + 8:,} bytes, {rec[idx]['size']:,} when the "
                                       "checkpoint was saved"]
    now = {bin_: rec[bin_], idx: dict(rec[idx], sha256="0" * 64), str(shards / "shard-00001.bin"): rec[bin_]}
    assert changed_files(rec, now) == [
        f"{idx}: manifest.json gives another sha256 than when the checkpoint was saved (the folder was prepared "
        "again)", f"{shards / 'shard-00001.bin'}: new, not part of the data the checkpoint was trained on"]
    os.unlink(idx)
    assert changed_files(rec, {bin_: rec[bin_]}) == [f"{idx}: removed"]


@pytest.mark.parametrize("change", ["same size, new bytes", "rewritten shorter", "grown", "deleted"])
def test_resume_on_changed_data_is_refused(tmp_path, tiny_recipe, tiny_shards, one_rank, monkeypatch, capsys, change):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.toml", run_dir, dropout=False, data={"shards": [str(shards)]},
                         train={"max_steps": 3, "stop_at_step": 2})
    assert _run(monkeypatch, recipe) == 0
    shard = shards / "shard-00000.bin"
    if change == "same size, new bytes":
        _flip_byte(shard)
        expect = f"{shard}: content replaced since the checkpoint was saved"
    elif change == "rewritten shorter":  # a consistent shard (same samples, one token less) in its place
        old = Shard.open(shards / "shard-00000")
        lengths = np.array(old.lengths)
        lengths[-1] -= 1
        size = shard.stat().st_size
        write_shard(shards / "shard-00000", np.array(old.tokens[:-1]), lengths, np.array(old.doc_index),
                    old.tokens.dtype)
        expect = f"{shard}: {size - 2:,} bytes, {size:,} when the checkpoint was saved"
    elif change == "grown":  # bytes appended, the index left as it was
        with open(shard, "ab") as f:
            f.write(b"\0\0")
        expect = f"{shard}: {shard.stat().st_size} bytes, the index promises"
    else:
        shard.unlink()
        expect = f"{shard}: missing"
    capsys.readouterr()
    assert _cli(monkeypatch, recipe, "train.stop_at_step=0") == 2
    err = capsys.readouterr().err
    assert expect in err, err[-2000:]
    assert [s for s, _ in _losses(run_dir)] == [1, 2]  # not one step on other data


def test_resume_on_the_same_data_goes_on(tmp_path, tiny_recipe, tiny_shards, one_rank, monkeypatch, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.toml", run_dir, dropout=False, data={"shards": [str(shards)]},
                         train={"max_steps": 3, "stop_at_step": 2})
    assert _run(monkeypatch, recipe) == 0
    recorded = json.loads((run_dir / "checkpoints" / "step2" / MARKER).read_text())["data_files"]
    assert sorted(recorded) == [str(shards / "shard-00000.bin"), str(shards / "shard-00000.idx")]
    for path in recorded:  # copied back or touched: new mtimes, same bytes
        os.utime(path)
    assert _run(monkeypatch, recipe, "train.stop_at_step=0") == 0
    assert [s for s, _ in _losses(run_dir)] == [1, 2, 3]


# -- C: a checkpoint whose pickle would run code -------------------------------------------------------------

def test_checkpoint_that_would_run_code_is_refused(tmp_path, tiny_recipe, one_rank, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.toml", run_dir, dropout=False, zero={"stage": 0},
                         train={"max_steps": 3, "stop_at_step": 2})
    assert _run(monkeypatch, recipe) == 0
    ckpt = run_dir / "checkpoints"
    ran = tmp_path / "code-ran"
    # someone hands over a checkpoint: DeepSpeed's model file with one more entry, checksums made to match
    hostile = ckpt / "step2" / "mp_rank_00_model_states.pt"
    state = torch.load(hostile, weights_only=False)
    state["note"] = Payload(ran)
    torch.save(state, hostile)
    marker = json.loads((ckpt / "step2" / MARKER).read_text())
    marker["files"] = checkpoint.checksum_files(ckpt / "step2")
    (ckpt / "step2" / MARKER).write_text(json.dumps(marker))
    torch.load(hostile, weights_only=False)  # what loading it the old way did: the payload runs
    assert ran.exists()
    ran.unlink()

    capsys.readouterr()
    assert _cli(monkeypatch, recipe, "train.stop_at_step=0") == 2
    err = capsys.readouterr().err
    assert f"{hostile}: refused to load: its pickle asks for io.open" in err, err[-2000:]
    with pytest.raises(ExportError, match="refused to load: its pickle asks for io.open"):
        export(run_dir, tmp_path / "hf")
    rng = ckpt / "step2" / "rng_rank0.pt"
    torch.save({"torch": torch.get_rng_state(), "extra": Payload(ran)}, rng)
    with pytest.raises(CheckpointError, match=f"{rng}: refused to load"):
        checkpoint.load_file(rng)
    assert not ran.exists()  # the payload never ran


class _ByName:
    """Pickles as getattr(CLS, NAME), as some Pythons (Debian 12's 3.11.2) pickle an int-valued Enum member."""

    def __init__(self, cls, name):
        self.cls, self.name = cls, name

    def __reduce__(self):
        return getattr, (self.cls, self.name)


def test_enum_members_pickled_by_name_load_and_no_other_getattr_does(tmp_path):
    """DeepSpeed's optimizer state holds a ZeroStageEnum; where the writing Python pickled it by name, export and
    resume refused our own checkpoints ("asks for getattr"). Members of the allowed Enum load; getattr reaching
    anything else is still refused."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    good = tmp_path / "optim_states.pt"
    torch.save({"zero_stage": _ByName(ZeroStageEnum, "gradients"), "t": torch.ones(2)}, good)
    state = checkpoint.load_file(good)
    assert state["zero_stage"] is ZeroStageEnum.gradients and state["t"].tolist() == [1.0, 1.0]
    for cls, name in ((ZeroStageEnum, "__class__"), (LossScaler, "__init__"), (ZeroStageEnum, "mro")):
        bad = tmp_path / f"bad-{name}.pt"
        torch.save({"x": _ByName(cls, name)}, bad)
        with pytest.raises(CheckpointError, match=f"{bad}: refused to load"):
            checkpoint.load_file(bad)


# -- D: another ZeRO stage at resume -------------------------------------------------------------------------

def test_resume_with_another_zero_stage(tmp_path, tiny_recipe, one_rank, monkeypatch, capsys):
    """ZeRO-1 -> 0 with bf16 died inside DeepSpeed (TypeError in unfused_optimizer.load_state_dict): refused
    with what was saved and what to do. ZeRO-1 -> 2 shares DeepSpeed's optimizer layout: allowed, exact."""
    run_dir, whole = tmp_path / "run", tmp_path / "whole"
    recipe = tiny_recipe(tmp_path / "r.toml", run_dir, dropout=False, zero={"stage": 1},
                         train={"max_steps": 3, "stop_at_step": 2, "precision": "bf16"})
    assert _run(monkeypatch, recipe) == 0
    capsys.readouterr()
    assert _cli(monkeypatch, recipe, "train.stop_at_step=0", "zero.stage=0") == 2
    err = capsys.readouterr().err
    assert (f"{run_dir / 'checkpoints' / 'step2'} was saved with ZeRO-1 and bf16; this recipe asks for ZeRO-0 and "
            "bf16") in err and f"dupmae export {run_dir} OUT_DIR" in err
    with pytest.raises(ConfigError, match="was saved with ZeRO-1 and bf16; this recipe asks for ZeRO-1 and fp32"):
        _run(monkeypatch, recipe, "train.stop_at_step=0", "train.precision=fp32")
    # a marker from before the stage was recorded: the files tell ZeRO 1 or 2
    path = run_dir / "checkpoints" / "step2" / MARKER
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                                if k not in ("zero_stage", "precision")}))
    with pytest.raises(ConfigError, match="was saved with ZeRO-1 or 2 and bf16; this recipe asks for ZeRO-3"):
        _run(monkeypatch, recipe, "train.stop_at_step=0", "zero.stage=3")

    assert _run(monkeypatch, recipe, "train.stop_at_step=0", "zero.stage=2") == 0
    assert _run(monkeypatch, recipe, "train.stop_at_step=0", f"train.run_dir={whole}") == 0
    assert _losses(run_dir) == _losses(whole)


def test_retention_removes_the_completion_marker_before_the_files(tmp_path, monkeypatch):
    """A removal by retention that is cut short (killed, a disk error midway) must not leave a folder that still
    looks complete with files missing: the marker goes first, so what is left is an incomplete folder (never a
    resume point, removed at the next save)."""
    ckpt = tmp_path / "checkpoints"
    for s in (2, 4, 6):
        (ckpt / f"step{s}").mkdir(parents=True)
        (ckpt / f"step{s}" / "model.pt").write_bytes(b"x" * 10)
        (ckpt / f"step{s}" / MARKER).write_text("{}")
    removed = []

    def cut_short(path, ignore_errors=False):  # the process dies before any file is removed
        removed.append(Path(path).name)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", cut_short)
    checkpoint.prune(ckpt, keep_last=1, keep_every=0, current=6)
    assert sorted(removed) == ["step2", "step4"]
    assert checkpoint.complete_steps(ckpt) == [6]  # the half-removed ones no longer count as complete
    assert (ckpt / "step2" / "model.pt").exists() and not (ckpt / "step2" / MARKER).exists()


def test_disk_full_writing_the_metrics_stops_74_naming_the_file(tmp_path, tiny_recipe, one_rank, monkeypatch,
                                                                capsys):
    """ENOSPC from metrics.jsonl (a full disk met outside a checkpoint save): exit 74 with the file named and the
    free space said; the checkpoint saved before stays the complete resume point."""
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.toml", run_dir, dropout=False, train={"max_steps": 6},
                         checkpoint={"every": 2, "keep_last": 2})
    target = run_dir / "metrics.jsonl"

    class FillsUp:
        def __init__(self, f):
            self.f, self.lines = f, 0

        def write(self, text):
            self.lines += 1
            if self.lines == 3:  # the third step's record
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(path, *args, **kwargs):
        f = open(path, *args, **kwargs)
        return FillsUp(f) if Path(path) == target else f

    monkeypatch.setattr(trainer, "open", fake_open, raising=False)
    capsys.readouterr()
    assert _cli(monkeypatch, recipe) == 74
    err = capsys.readouterr().err
    assert f"disk full: {target}: [Errno {errno.ENOSPC}] No space left on device; " in err, err[-3000:]
    assert "free" in err.split("disk full:")[1] and "run the same command again" in err
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest_complete").read_text() == "step2" and checkpoint.complete_steps(ckpt) == [2]
