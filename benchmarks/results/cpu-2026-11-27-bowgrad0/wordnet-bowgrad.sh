#!/bin/bash
# The main job's fine-tuning again with model.bow_encoder_grad=0 (after scripts/main.sh), evaluated as main.sh does.
set -euo pipefail
cd /work/main && source .venv/bin/activate && export OMP_NUM_THREADS=1
r=work/runs/finetune-wordnet-bowgrad0
port=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
deepspeed --num_gpus 2 --no_local_rank --master_port "$port" "$(command -v dupmae)" finetune --config configs/finetune-wordnet-cpu.toml model.bow_encoder_grad=0 train.run_dir="\"$r\""
dupmae export "$r" work/exports/finetune-wordnet-bowgrad0 --overwrite
OMP_NUM_THREADS=2 dupmae eval --model work/exports/finetune-wordnet-bowgrad0 --data data/wordnet --max-queries 300 --max-documents 3000 --cache-dir work/cache/embeddings --no-progress --out "$r/eval-wordnet.json"
python scripts/main_table.py "pre-trained only (no fine-tuning)=work/runs/demo-cpu/eval-wordnet.json" \
  "starting MiniLM encoder fine-tuned (same recipe)=work/runs/finetune-wordnet-start/eval-wordnet.json" \
  "DupMAE pre-trained + fine-tuned=work/runs/finetune-wordnet/eval-wordnet.json" \
  "DupMAE pre-trained + fine-tuned, bow_encoder_grad 0=$r/eval-wordnet.json"
