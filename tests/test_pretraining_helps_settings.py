"""benchmarks/pretraining_helps.py: a work folder keeps one preset's settings and refuses another's stages."""
import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pretraining_helps as ph  # noqa: E402


def test_first_run_records_settings_and_same_preset_passes(tmp_path):
    ph.check_settings(tmp_path, "cpu", dict(ph.PRESETS["cpu"]))
    saved = json.loads((tmp_path / "settings.json").read_text())
    assert saved["preset"] == "cpu" and saved["settings"]["pre_steps"] == ph.PRESETS["cpu"]["pre_steps"]
    ph.check_settings(tmp_path, "cpu", dict(ph.PRESETS["cpu"]))  # a resumed run: same settings, no error
    ph.check_settings(tmp_path, "cpu", dict(ph.PRESETS["cpu"], jobs=4))  # runs side by side change no result


def test_other_settings_refused_naming_the_keys(tmp_path):
    ph.check_settings(tmp_path, "cpu", dict(ph.PRESETS["cpu"]))
    before = (tmp_path / "settings.json").read_text()
    with pytest.raises(SystemExit) as err:
        ph.check_settings(tmp_path, "cpu-long", dict(ph.PRESETS["cpu-long"]))
    msg = str(err.value)
    assert "settings.json" in msg and "pre_steps: 1500 there, 3000 now" in msg and "--work" in msg
    assert (tmp_path / "settings.json").read_text() == before  # the folder's record is left as it was


@pytest.mark.parametrize("text", ["{not json", "[]", '{"preset": "cpu"}'])
def test_unreadable_settings_file_named(tmp_path, text):
    (tmp_path / "settings.json").write_text(text)
    with pytest.raises(SystemExit) as err:
        ph.check_settings(tmp_path, "cpu", dict(ph.PRESETS["cpu"]))
    assert "settings.json: unreadable" in str(err.value)


def test_default_preset_exists_and_cpu_long_differs_from_cpu_in_steps_only():
    assert ph.DEFAULT_PRESET in ph.PRESETS
    long, short = ph.PRESETS["cpu-long"], ph.PRESETS["cpu"]
    assert {k for k in long.keys() | short.keys() if long.get(k) != short.get(k)} == {"pre_steps"}


def _args(**kw):
    return argparse.Namespace(**{"preset": "cpu-long", "pre_seed": ph.PRE_SEED, "work": None, **kw})


def test_default_pre_seed_keeps_folders_settings_and_files():
    a = _args()
    assert "pre_seed" not in ph.settings(a)  # folders recorded before the option still match
    assert ph.work_dir(a).name == "pretraining-helps-cpu-long" and ph._suffix(a) == "_cpu-long"
    assert ph._suffix(_args(preset="cpu")) == ""


def test_other_pre_seed_has_its_own_folder_files_settings_and_recipe(tmp_path):
    a = _args(pre_seed=2, work=str(tmp_path / "w"))
    p = ph.settings(a)
    assert p["pre_seed"] == 2 and ph.work_dir(a) == tmp_path / "w-pseed2" and ph._suffix(a) == "_cpu-long-pseed2"
    recipe = ph.recipe_text(p, tmp_path / "s", tmp_path / "r", "dupmae", 10, 4, 1e-3)
    data, train = recipe.split("[data]")[1].split("[train]")
    assert "seed = 2\n" in data and "seed = 2\n" in train.split("[optim]")[0]  # data order + masks, weights
    # a folder of the default seed refuses this seed's settings (the guard sees the key)
    ph.check_settings(tmp_path, "cpu-long", ph.settings(_args()))
    with pytest.raises(SystemExit, match="pre_seed: None there, 2 now"):
        ph.check_settings(tmp_path, "cpu-long", p)


@pytest.mark.parametrize("text, ok", [("1234", (1234,)), ("1234,2", (1234, 2)), ("1,x", None), ("2,2", None)])
def test_pre_seed_list(text, ok):
    if ok:
        assert ph.pre_seed_list(text) == ok
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
            ph.pre_seed_list(text)


def _fake_run(work: Path, start: str, seed: int, per_query: list):
    """A fine-tuning record as ft_eval writes it: one collection, hybrid scored, the given per-query NDCG@10."""
    pq = {f"q{i}": {"ndcg@10": v} for i, v in enumerate(per_query)}
    mean = sum(per_query) / len(per_query)
    rec = {"start": start, "mode": "hybrid", "seed": seed, "steps": 1, "train_s": 1.0, "machine": "m",
           "commit": "c", "results": {"scifact": {"rows": {"hybrid": {"ndcg@10": mean, "recall@100": 0.5,
                                                                        "mrr@10": mean}},
                                                   "per_query": {"hybrid": pq}}}}
    Stages = ph.Stages(work)
    (Stages.dir / f"ft-{start}-hybrid-seed{seed}.json").write_text(json.dumps(rec))


def test_pooled_report_pools_every_run_and_shows_each_pre_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(ph, "RESULTS", tmp_path / "results")
    base = tmp_path / "w"
    n_q = 40
    for pre_seed, folder, shift in ((ph.PRE_SEED, base, 0.0), (7, Path(f"{base}-pseed7"), 0.1)):
        for ft_seed in (1, 2):
            _fake_run(folder, "mlm", ft_seed, [0.2 + shift] * n_q)
            _fake_run(folder, "dupmae", ft_seed, [0.6 + shift] * n_q)
    ph.pooled_report(_args(work=str(base)), (ph.PRE_SEED, 7))
    md = (tmp_path / "results" / "pretraining_helps_cpu-long-pseeds1234+7.md").read_text()
    assert (tmp_path / "results" / "pretraining_helps_ndcg_cpu-long-pseeds1234+7.png").stat().st_size > 0
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in md.splitlines()
            if line.startswith("| MLM") or line.startswith("| DupMAE")}
    # n: 2 pre-training x 2 fine-tuning seeds; the mean pools all four; the per-seed column splits them
    assert rows["MLM (BERT)"][3:6] == ["4", "0.250 ± 0.050", "0.200 / 0.300"]
    assert rows["DupMAE"][3:6] == ["4", "0.650 ± 0.050", "0.600 / 0.700"]
    assert float(rows["DupMAE"][-2]) < 0.001  # 40 queries, every one better
    assert rows["DupMAE"][-1].rstrip(" |") == "2/2"  # above MLM under both pre-training seeds
    assert "pre-training seeds 1234, 7" in md
    # a third seed in which DupMAE is below MLM: counted as such
    for ft_seed in (1, 2):
        _fake_run(Path(f"{base}-pseed8"), "mlm", ft_seed, [0.3] * n_q)
        _fake_run(Path(f"{base}-pseed8"), "dupmae", ft_seed, [0.1] * n_q)
    ph.pooled_report(_args(work=str(base)), (ph.PRE_SEED, 7, 8))
    md = (tmp_path / "results" / "pretraining_helps_cpu-long-pseeds1234+7+8.md").read_text()
    dup = next(line for line in md.splitlines() if line.startswith("| DupMAE"))
    assert dup.endswith("| 0.600 / 0.700 / 0.100 | 0.500 ± 0.000 | 5e-05 | 2/3 |"), dup
    # a seed with no folder yet: reported as 0 runs, and no folder is made for it
    ph.pooled_report(_args(work=str(base)), (ph.PRE_SEED, 7, 9))
    assert not Path(f"{base}-pseed9").exists()
    assert "9: w-pseed9 (0 runs)" in (tmp_path / "results" / "pretraining_helps_cpu-long-pseeds1234+7+9.md").read_text()


def test_records_keep_the_day_they_were_made(tmp_path, monkeypatch):
    """A report rebuilt later dates every run by its record, not by the day of the rebuild; a record from before
    records carried a date is dated by its file."""
    import os
    import datetime as dt

    monkeypatch.setattr(ph, "RESULTS", tmp_path / "results")
    work = tmp_path / "w"
    _fake_run(work, "mlm", 1, [0.2] * 10)  # no "date" key: the file's day counts
    old = dt.datetime(2026, 1, 2, 12, 0).timestamp()
    os.utime(work / "stages" / "ft-mlm-hybrid-seed1.json", (old, old))
    _fake_run(work, "dupmae", 1, [0.4] * 10)
    rec = json.loads((work / "stages" / "ft-dupmae-hybrid-seed1.json").read_text())
    (work / "stages" / "ft-dupmae-hybrid-seed1.json").write_text(json.dumps({**rec, "date": "2026-03-04"}))
    recs = ph._records(work)
    assert [r["date"] for r in recs] == ["2026-03-04", "2026-01-02"]  # name order: dupmae, mlm
    assert ph._dates(recs) == "2026-01-02 to 2026-03-04"
    assert ph._dates(recs[:1]) == "2026-03-04"
    ph.pooled_report(_args(work=str(work)), (ph.PRE_SEED,))
    md = (tmp_path / "results" / f"pretraining_helps_cpu-long-pseeds{ph.PRE_SEED}.md").read_text()
    assert "evaluated on m, 2026-01-02 to 2026-03-04." in md


def test_tag_names_the_files_apart_and_only_takes_file_name_characters():
    assert ph._suffix(_args(tag="rerun")) == "_cpu-long-rerun"
    assert ph._suffix(_args(pre_seed=2, tag="rerun")) == "_cpu-long-pseed2-rerun"
    assert ph._suffix(_args(preset="cpu", tag="rerun")) == "_cpu-rerun"  # the cpu preset's bare name is its own
    assert ph._suffix(_args(tag=None)) == "_cpu-long"
    assert ph.tag_name("ours-continued.2") == "ours-continued.2"
    for bad in ("", "a/b", "../x", "-x", "a b"):
        with pytest.raises(argparse.ArgumentTypeError, match="letters, digits"):
            ph.tag_name(bad)


def test_machine_name_says_which_cpu(tmp_path):
    import torch

    isa = torch.backends.cpu.get_cpu_capability()
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some  CPU 9000\nflags\t\t: fpu avx512f amx_tile\n\n"
                    "processor\t: 1\nmodel name\t: Some  CPU 9000\nflags\t\t: fpu avx512f amx_tile\n")
    assert ph.cpu_model(info) == f"Some CPU 9000, {isa}, AMX"
    info.write_text("model name\t: Other CPU\nflags\t\t: fpu avx2\n")
    assert ph.cpu_model(info) == f"Other CPU, {isa}"
    assert ph.cpu_model(tmp_path / "missing") == f"unknown CPU, {isa}"
    assert f"cpu ({ph.cpu_model()})" in ph.machine_name()


def test_gpu_short_is_the_gpu_model_with_fewer_steps():
    """The preset sized to one short GPU call keeps the gpu preset's model, vocabulary, lengths and fine-tuning."""
    gpu, short = ph.PRESETS["gpu"], ph.PRESETS["gpu-short"]
    differ = sorted(k for k in set(gpu) | set(short) if gpu.get(k) != short.get(k))
    assert differ == ["jobs", "pre_lr", "pre_micro", "pre_steps"]
    assert short["pre_steps"] * short["pre_micro"] < gpu["pre_steps"] * gpu["pre_micro"]


def test_console_scripts_are_found_beside_the_interpreter_or_on_path(tmp_path, monkeypatch):
    """`pip --target` (scripts/device_run.sh) puts deepspeed's and dupmae's scripts in a bin/ of their own."""
    monkeypatch.setattr(ph, "BIN", tmp_path / "interpreter-bin")
    (tmp_path / "interpreter-bin").mkdir()
    other = tmp_path / "site-bin"
    other.mkdir()
    (other / "deepspeed").write_text("#!/bin/sh\n")
    (other / "deepspeed").chmod(0o755)
    monkeypatch.setenv("PATH", str(other))
    assert ph.script("deepspeed") == str(other / "deepspeed")
    (tmp_path / "interpreter-bin" / "deepspeed").write_text("")
    assert ph.script("deepspeed") == str(tmp_path / "interpreter-bin" / "deepspeed")  # the interpreter's first
    with pytest.raises(SystemExit, match="dupmae: not beside .* nor on PATH"):
        ph.script("dupmae")


@pytest.mark.slow
def test_data_only_makes_the_text_tokenizer_and_shards_and_trains_nothing(tmp_path):
    import subprocess

    script = Path(ph.__file__)
    work = tmp_path / "w"
    r = subprocess.run([sys.executable, script, "--preset", "smoke", "--work", work, "--data-only"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ready (--data-only: nothing trained)" in r.stderr
    assert sorted(p.stem for p in (work / "stages").glob("*.json")) == ["shards", "text", "tokenizer"]
    assert (work / "shards-128" / "manifest.json").is_file() and not (work / "runs").exists()
    r = subprocess.run([sys.executable, script, "--preset", "smoke", "--work", work, "--data-only", "--part",
                        "continued"], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "--data-only makes the scratch part's text, tokenizer and shards" in r.stderr
