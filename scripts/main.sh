#!/usr/bin/env bash
# The main job on the embedded default data: set up, prepare the WordNet corpus into shards, inspect them,
# pre-train DupMAE (configs/demo-cpu.toml) on 2 ranks through the deepspeed launcher, export the result as a
# Hugging Face folder, and evaluate it as a retriever (dense, BoW, hybrid, and BM25 beside it) on the
# embedded WordNet retrieval task (data/wordnet/README.md).
# Running it again resumes the run from its newest checkpoint (delete work/runs/demo-cpu to start over).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
source .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

dupmae prepare data/wordnet/corpus.jsonl --out work/shards/wordnet-128 --max-len 128
dupmae inspect work/shards/wordnet-128 --samples 2

# two CPU ranks; on a GPU machine, one rank per GPU
ranks=2
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then ranks=$(nvidia-smi -L | wc -l); fi
port=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
deepspeed --num_gpus "$ranks" --no_local_rank --master_port "$port" "$(command -v dupmae)" \
  pretrain --config configs/demo-cpu.toml "$@"

run=work/runs/demo-cpu
dupmae export "$run" work/exports/demo-cpu --overwrite

# The WordNet task: 1,000 usage-example queries, each judged relevant to its synset's definition. On a CPU
# the corpus is a seeded sample (all judged documents + distractors) so this step takes a few minutes;
# drop --max-queries/--max-documents for the full 38,488-document corpus.
# (one process: every core, not the one thread per rank that pre-training used)
OMP_NUM_THREADS=$(nproc) dupmae eval --model work/exports/demo-cpu --data data/wordnet --max-queries 300 --max-documents 3000 \
  --out "$run/eval-wordnet.json" --cache-dir work/cache/embeddings

echo
echo "Run directory: $run"
echo "  metrics:     $run/metrics.jsonl (one line per step)"
echo "  checkpoints: $run/checkpoints ($(cat $run/checkpoints/latest_complete 2>/dev/null || echo none) is the newest)"
echo "  TensorBoard: tensorboard --logdir $run/tensorboard   (then open http://localhost:6006)"
echo "  export:      work/exports/demo-cpu (transformers.AutoModelForMaskedLM loads it as it is)"
echo "  evaluation:  $run/eval-wordnet.json"
