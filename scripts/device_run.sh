#!/usr/bin/env bash
# On a GPU machine without network, with the bundle of scripts/device_bundle.py carried beside the checkout:
# install what the machine lacks, run one command within a time budget, and keep its progress in $OUT.
#
#   bash scripts/device_run.sh [--budget S] [--pack DIR]... -- COMMAND [ARG...]
#
# e.g. the pre-training experiment's GPU preset in one 10-minute call (benchmarks/README.md):
#   bash scripts/device_run.sh --budget 540 --pack work/pretraining-helps-gpu-short -- \
#     python3 benchmarks/pretraining_helps.py --preset gpu-short --data /tmp/dupmae-data
#
# 1. The bundle's wheels and this project (from the working tree, so the code that runs is the checkout's) go
#    into a folder of their own ($DUPMAE_SITE, default /tmp/dupmae-site) on PYTHONPATH; nothing else is touched.
# 2. The collections are unpacked to /tmp/dupmae-data/<name>; the bundle's work folders into work/, each only
#    where work/<name> does not exist yet: a second call on the same machine resumes from the stages and
#    checkpoints the first one left.
# 3. COMMAND runs from the repository root under `timeout` (SIGTERM to its process group, which the trainers
#    answer with a checkpoint) so that it ends --budget seconds (default 540) after this script started; every
#    45 s, and once at the end, the --pack folders (without model weights, checkpoints, shards or text) are packed
#    into $OUT/progress.tgz, so a call cut short still brings back what finished.
# $OUT gets: device.txt (machine, versions, timings, exit status), run.log (everything printed), progress.tgz.
# Environment: OUT (required), DUPMAE_BUNDLE (default .dev), PYTHON (default python3), DUPMAE_SITE, DUPMAE_DATA_DIR
# (default /tmp/dupmae-data), DUPMAE_WORK (default work/).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
t0=$(date +%s)
budget=540
packs=()
while (($#)); do
  case $1 in
    --budget) budget=$2; shift 2 ;;
    --pack) packs+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "device_run.sh: unknown option $1 (usage: [--budget S] [--pack DIR]... -- COMMAND...)" >&2; exit 2 ;;
  esac
done
(($#)) || { echo "device_run.sh: no command after --" >&2; exit 2; }
: "${OUT:?device_run.sh: set OUT to the folder whose files come back}"
bundle=${DUPMAE_BUNDLE:-$root/.dev}
py=${PYTHON:-python3}
site=${DUPMAE_SITE:-/tmp/dupmae-site}
data=${DUPMAE_DATA_DIR:-/tmp/dupmae-data}
workdir=${DUPMAE_WORK:-$root/work}
if [[ ! -f $bundle/MANIFEST.json ]]; then
  echo "device_run.sh: $bundle/MANIFEST.json missing: make the bundle with scripts/device_bundle.py, carry it" >&2
  exit 2
fi
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
elapsed() { echo $(($(date +%s) - t0)); }
log() { printf '[device %4ss] %s\n' "$(elapsed)" "$*"; }

# 1. packages
rm -rf "$site" && mkdir -p "$site"
before=$(ls -d "$root"/build "$root"/*.egg-info 2>/dev/null)
if ! "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-build-isolation \
    --target "$site" "$bundle"/whl/*.whl "$root" > "$OUT/pip.log" 2>&1; then
  cat "$OUT/pip.log"; log "installing the bundle's wheels and the project failed"; exit 1
fi
for made in "$root"/build "$root"/*.egg-info; do  # what building the project left, not what was there before
  [[ -e $made ]] && ! grep -qxF "$made" <<< "$before" && rm -rf "$made"
done
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PATH=$site/bin:$PATH PYTHONUNBUFFERED=1
log "installed into $site"

# 2. data and work folders
stage=$(mktemp -d) && tar -C "$stage" -xJf "$bundle/data.tar.xz" && rm -rf "$data" && mkdir -p "$(dirname "$data")" \
  && mv "$stage/dupmae-data" "$data" && rm -rf "$stage" || { log "unpacking $bundle/data.tar.xz failed"; exit 1; }
if [[ -f $bundle/work.tar.xz ]]; then
  stage=$(mktemp -d) && tar -C "$stage" -xJf "$bundle/work.tar.xz" && mkdir -p "$workdir" \
    || { log "unpacking $bundle/work.tar.xz failed"; exit 1; }
  for d in "$stage"/*/; do
    name=$(basename "$d")
    if [[ -e $workdir/$name ]]; then
      log "$workdir/$name: kept (from an earlier call on this machine)"
    else
      mv "$d" "$workdir/$name" && log "$workdir/$name: from the bundle"
    fi
  done
  rm -rf "$stage"
fi
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  "$py" - <<'PY' 2>&1 | grep -v WARNING
import importlib.metadata as md
import torch
print(" ".join(f"{n} {md.version(n)}" for n in ("torch", "transformers", "deepspeed", "triton", "dupmae")),
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
PY
  echo "cpus $(nproc --all)"
  echo "bundle $(tr -d '\n ' < "$bundle/MANIFEST.json" | grep -o '"commit":"[^"]*"')"
  echo "setup $(elapsed) s"
} > "$OUT/device.txt"
cat "$OUT/device.txt"

# 3. the command, packed as it goes
pack() {
  ((${#packs[@]})) || return 0
  tar -czf "$OUT/progress.tgz.tmp" --exclude='exports' --exclude='checkpoints' --exclude='shards-*' \
    --exclude='text' --exclude='tokenizer' --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' \
    "${packs[@]}" 2>/dev/null
  mv -f "$OUT/progress.tgz.tmp" "$OUT/progress.tgz"
}
left=$((budget - $(elapsed) - 15))
((left > 0)) || { log "no time left for the command (--budget $budget)"; exit 1; }
log "running for at most ${left} s: $*"
timeout --kill-after=20 "$left" "$@" &
cmd=$!
( while kill -0 "$cmd" 2>/dev/null; do sleep 45; pack; done ) </dev/null >/dev/null 2>&1 &
packer=$!
wait "$cmd"
rc=$?
pkill -P "$packer" 2>/dev/null; kill "$packer" 2>/dev/null; wait "$packer" 2>/dev/null  # its sleep too
pack
[[ $rc == 124 ]] && log "stopped at the budget ($budget s): run the same call again on this machine to resume"
echo "command exit $rc after $(elapsed) s" >> "$OUT/device.txt"
log "command exit $rc; $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
