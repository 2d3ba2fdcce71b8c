"""benchmarks/pretraining_helps.py: a work folder keeps one preset's settings and refuses another's stages."""
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
