#!/usr/bin/env bash
# One idempotent set-up step, used by both README commands.
#   .venv with torch installed FIRST (CPU build without a GPU, the regular build where nvidia-smi sees one),
#   then deepspeed built without isolation (on CPU with its shm_comm and cpu_adam ops prebuilt),
#   then this package, editable, with its test and eval extras; everything under constraints.txt plus a pin
#   of the torch just installed, so no later step can pull another torch build.
# A second run checks a fingerprint and returns in well under a second.
#
# Environment: DUPMAE_VENV (default .venv), DUPMAE_TORCH_VERSION (default 2.13.0),
#              DUPMAE_TORCH_INDEX_URL (a package index serving CPU torch builds, where PyPI's default is CUDA).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=${DUPMAE_VENV:-$root/.venv}
torch_version=${DUPMAE_TORCH_VERSION:-2.13.0}
log() { printf '[setup] %s\n' "$*" >&2; }

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi

fingerprint=$({ cat pyproject.toml constraints.txt scripts/setup.sh; echo "torch=$torch_version gpu=$gpu"; } | sha256sum | cut -c1-16)
stamp="$venv/.dupmae-setup"
if [[ -f $stamp && $(cat "$stamp") == "$fingerprint" ]] && [[ -x $venv/bin/dupmae ]]; then
  log "$venv is up to date"
  exit 0
fi

[[ -x $venv/bin/python ]] || { log "creating $venv"; python3 -m venv "$venv"; }
py="$venv/bin/python"
pip_install() { "$py" -m pip install --disable-pip-version-check --progress-bar off "$@"; }

pip_install -q --upgrade "pip>=24" "setuptools>=68" wheel packaging ninja "numpy>=1.26"

if ! "$py" -c "import torch" 2>/dev/null; then
  if (( gpu )); then
    log "GPU found: installing torch==$torch_version (CUDA build)"
    pip_install "torch==$torch_version"
  else
    log "no GPU: installing torch==$torch_version (CPU build)"
    pip_install "torch==$torch_version" ${DUPMAE_TORCH_INDEX_URL:+--index-url "$DUPMAE_TORCH_INDEX_URL"}
  fi
fi
installed_torch=$("$py" -c "import torch; print(torch.__version__)")
log "torch $installed_torch"
cons="$venv/constraints.txt"
{ cat constraints.txt; echo "torch==$installed_torch"; } > "$cons"

if ! "$py" -c "import deepspeed" 2>/dev/null; then
  if (( gpu )); then
    log "installing deepspeed (ops JIT-built on first use)"
    DS_BUILD_OPS=0 pip_install --no-build-isolation -c "$cons" deepspeed
  else
    log "installing deepspeed with its CPU ops prebuilt (shm_comm, cpu_adam): a few minutes, once"
    DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 pip_install --no-build-isolation -c "$cons" deepspeed
  fi
fi

log "installing dupmae (editable) with extras test, eval, mpi"
pip_install -q -c "$cons" -e ".[test,eval,mpi]"

"$py" -c "import dupmae.engine, dupmae.kernels, dupmae.data_pipeline, dupmae.cluster, deepspeed, torch" \
  || { log "import check failed"; exit 1; }
echo "$fingerprint" > "$stamp"
log "ready: $venv (activate with: source $venv/bin/activate)"
