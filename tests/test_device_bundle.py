"""scripts/device_bundle.py (what a GPU machine without network must be brought) and scripts/device_run.sh (the
command there, within a time budget, its progress packed into $OUT). Nothing here downloads: the wheels in the
run test are made on the spot."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("device_bundle", REPO / "scripts" / "device_bundle.py")
bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bundle)
ENV = bundle.target_env("3.12")


def make_wheel(folder: Path, name: str, version: str = "1.0", requires=(), module: str | None = None) -> Path:
    """A pure-Python wheel: `module`.py (VALUE = name) and METADATA with the given Requires-Dist lines."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        if module:
            z.writestr(f"{module}.py", f"VALUE = {name!r}\n")
        z.writestr(f"{info}/METADATA", meta)
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_read_have_takes_pip_freeze_and_names_a_bad_line(tmp_path):
    f = tmp_path / "freeze.txt"
    f.write_text("# the machine\nTorch==2.11.0\nsentence_transformers==6.0.1\nnumpy @ file:///x\n\n")
    assert bundle.read_have(str(f)) == {"torch", "sentence-transformers", "numpy"}
    f.write_text("torch==2.11.0\n==1.0\n")
    with pytest.raises(SystemExit, match=r"freeze.txt:2: not a package line"):
        bundle.read_have(str(f))
    assert {"torch", "transformers", "triton"} <= bundle.read_have(None)
    assert "deepspeed" not in bundle.read_have(None)


def test_closure_brings_what_the_machine_lacks_and_nothing_it_has():
    """DeepSpeed's own needs that the image lacks (pydantic and its parts, hjson) come along; torch, which the
    machine has, and its requirements are not followed."""
    need = bundle.closure(["deepspeed", "torch"], bundle.read_have(None), ENV)
    assert {"deepspeed", "hjson", "pydantic", "pydantic-core"} <= set(need)
    assert "torch" not in need and "numpy" not in need
    assert need["deepspeed"] == __import__("deepspeed").__version__
    with pytest.raises(SystemExit, match="no-such-package-here: needed on the machine but not installed here"):
        bundle.closure(["no-such-package-here"], set(), ENV)


def test_check_wheels_names_a_requirement_neither_there_nor_bundled(tmp_path):
    a = make_wheel(tmp_path, "alpha", requires=["beta>=1", "torch", "gamma; python_version < '3.8'",
                                                "delta; extra == 'docs'"])
    b = make_wheel(tmp_path, "beta")
    bundle.check_wheels([a, b], {"torch"}, ENV)  # gamma's marker and delta's extra do not apply
    with pytest.raises(SystemExit, match=r"alpha-1.0-py3-none-any.whl needs beta>=1"):
        bundle.check_wheels([a], {"torch"}, ENV)


def test_work_members_are_what_cannot_be_made_offline(tmp_path):
    w = tmp_path / "pretraining-helps-x"
    with pytest.raises(SystemExit, match="no settings.json"):
        bundle.work_members(w)
    for d in ("stages", "tokenizer", "text", "runs"):
        (w / d).mkdir(parents=True)
    (w / "settings.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"shards-\* missing: make them first with .*--data-only"):
        bundle.work_members(w)
    (w / "shards-256").mkdir()
    assert [p.name for p in bundle.work_members(w)] == ["settings.json", "stages", "tokenizer", "shards-256"]


def fake_bundle(root: Path) -> Path:
    """A bundle as device_bundle.py lays it out: one wheel, the collections, one work folder."""
    b = root / "bundle"
    make_wheel(b / "whl", "bundledthing", module="bundledthing")
    (b / "MANIFEST.json").write_text(json.dumps({"commit": "test"}))
    src = root / "src"
    (src / "dupmae-data" / "scifact").mkdir(parents=True)
    (src / "dupmae-data" / "scifact" / "corpus.jsonl").write_text('{"_id": "1", "text": "x"}\n')
    (src / "w" / "stages").mkdir(parents=True)
    (src / "w" / "stages" / "shards.json").write_text("{}")
    (src / "w" / "settings.json").write_text("{}")
    with tarfile.open(b / "data.tar.xz", "w:xz") as t:
        t.add(src / "dupmae-data", arcname="dupmae-data")
    with tarfile.open(b / "work.tar.xz", "w:xz") as t:
        t.add(src / "w", arcname="pretraining-helps-x")
    return b


# The command: stages finish one by one; model files appear that must not travel; then it outlasts the budget
STEPS = """
import os, sys, time
from pathlib import Path
import bundledthing, dupmae.engine
w = Path(os.environ["DUPMAE_WORK"]) / "pretraining-helps-x"
print("imports from", Path(bundledthing.__file__).parent, "data", sorted(os.listdir(sys.argv[1])), flush=True)
(w / "exports" / "mlm").mkdir(parents=True, exist_ok=True)
(w / "exports" / "mlm" / "model.safetensors").write_bytes(b"0" * 1000)
(w / "runs" / "a").mkdir(parents=True, exist_ok=True)
(w / "runs" / "a" / "metrics.jsonl").write_text("{}")
for i in range(int(sys.argv[2])):
    (w / "stages" / f"step{i}.json").write_text("{}")
    time.sleep(1)
"""


@pytest.mark.slow
def test_device_run_installs_runs_within_the_budget_and_packs_progress(tmp_path):
    """Installs the bundle's wheel and the project into a folder of its own, unpacks data and work, stops the
    command at the budget (exit 124) with what it finished packed in $OUT (no model weights), and a second call
    keeps the work folder the first one left."""
    b = fake_bundle(tmp_path)
    out, work, site, data = tmp_path / "out", tmp_path / "work", tmp_path / "site", tmp_path / "data"
    (tmp_path / "cmd.py").write_text(STEPS)
    env = {**os.environ, "OUT": str(out), "DUPMAE_BUNDLE": str(b), "PYTHON": sys.executable, "DUPMAE_SITE": str(site),
           "DUPMAE_DATA_DIR": str(data), "DUPMAE_WORK": str(work)}
    env.pop("PYTHONPATH", None)
    cmd = ["bash", str(REPO / "scripts" / "device_run.sh"), "--budget", "", "--pack", str(work / "pretraining-helps-x"),
           "--", sys.executable, str(tmp_path / "cmd.py"), str(data), ""]

    built_before = sorted(REPO.glob("build")) + sorted(REPO.glob("*.egg-info"))
    t = time.monotonic()
    first = subprocess.run([*cmd[:3], "35", *cmd[4:-1], "600"], env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t
    assert first.returncode == 124, first.stdout[-3000:] + first.stderr[-3000:]
    assert took < 35 + 40, took  # the budget, the kill grace and the final pack
    log = (out / "run.log").read_text()
    assert f"imports from {site}" in log and "data ['scifact']" in log, log[-2000:]
    assert "stopped at the budget (35 s)" in log
    assert "command exit 124" in (out / "device.txt").read_text()
    with tarfile.open(out / "progress.tgz") as t:
        names = t.getnames()
    steps = [n for n in names if "/stages/step" in n]
    assert len(steps) >= 5, names  # finished stages came back
    assert any(n.endswith("runs/a/metrics.jsonl") for n in names) and any(n.endswith("settings.json") for n in names)
    assert not any("exports" in n or n.endswith(".safetensors") for n in names), names
    assert (data / "scifact" / "corpus.jsonl").is_file()
    assert sorted(REPO.glob("build")) + sorted(REPO.glob("*.egg-info")) == built_before  # its build left nothing
    (work / "pretraining-helps-x" / "from-the-first-call").write_text("")

    second = subprocess.run([*cmd[:3], "120", *cmd[4:-1], "2"], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = (out / "run.log").read_text()
    assert "pretraining-helps-x: kept (from an earlier call on this machine)" in log
    assert (work / "pretraining-helps-x" / "from-the-first-call").exists()
    assert "command exit 0" in (out / "device.txt").read_text()


def test_device_run_refuses_without_a_bundle_or_a_command(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DUPMAE_BUNDLE": str(tmp_path / "none")}
    r = subprocess.run(["bash", str(REPO / "scripts" / "device_run.sh"), "--", "true"], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "MANIFEST.json missing: make the bundle with scripts/device_bundle.py" in r.stderr
    r = subprocess.run(["bash", str(REPO / "scripts" / "device_run.sh"), "--budget", "10"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no command after --" in r.stderr
