#!/bin/bash
# The main job's fine-tuning again with recipe overrides (after scripts/main.sh), evaluated as main.sh does:
#   bash benchmarks/results/cpu-2026-11-27-headlr/wordnet-variant.sh NAME KEY=VALUE...
set -euo pipefail
cd "$(dirname "$0")/../../.." && source .venv/bin/activate && export OMP_NUM_THREADS=1
name=$1; shift
r=work/runs/finetune-wordnet-$name
port=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
deepspeed --num_gpus 2 --no_local_rank --master_port "$port" "$(command -v dupmae)" finetune --config configs/finetune-wordnet-cpu.toml "$@" train.run_dir="\"$r\""
dupmae export "$r" "work/exports/finetune-wordnet-$name" --overwrite
OMP_NUM_THREADS=2 dupmae eval --model "work/exports/finetune-wordnet-$name" --data data/wordnet --max-queries 300 --max-documents 3000 --cache-dir work/cache/embeddings --no-progress --out "$r/eval-wordnet.json"
