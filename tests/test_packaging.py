"""The distribution installs the four top-level folders as dupmae.* packages, editable and regular."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels", "data_pipeline", "cluster")


def test_regular_install_imports_from_a_built_wheel(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("dupmae-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in PACKAGES:
        assert f"dupmae/{pkg}/__init__.py" in names
    assert not any(n.split("/")[0] in PACKAGES for n in names), "a bare top-level package leaked"
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    code = ("import dupmae.engine, dupmae.kernels, dupmae.data_pipeline, dupmae.cluster, sys; "
            "from dupmae.data_pipeline.shards import Shard; "
            f"assert dupmae.data_pipeline.__file__.startswith({str(target)!r}), dupmae.data_pipeline.__file__")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env={"PYTHONPATH": str(target)})


def test_editable_install_imports_from_any_directory(tmp_path):
    code = ("import dupmae.data_pipeline, dupmae.kernels.philox; "
            f"assert dupmae.data_pipeline.__file__.startswith({str(ROOT)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_console_entry_point_lists_subcommands():
    exe = Path(sys.executable).with_name("dupmae")
    out = subprocess.run([str(exe), "--help"], check=True, capture_output=True, text=True).stdout
    assert "prepare" in out and "inspect" in out
