#!/usr/bin/env bash
# The main job on the embedded default data: set up, prepare the WordNet corpus into shards, inspect them.
# Later stages (pre-training, export, retrieval evaluation) extend this script as they land.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
source .venv/bin/activate
work=${DUPMAE_WORK:-$root/work}
mkdir -p "$work"

dupmae prepare data/wordnet/corpus.jsonl --out "$work/shards/wordnet-128" --max-len 128
dupmae inspect "$work/shards/wordnet-128"
echo
echo "Shards are in $work/shards/wordnet-128 (manifest.json lists every file and its sha256)."
