#!/bin/bash
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/shim:/tmp/site
t0=$(date +%s); mkdir -p $OUT/pack
for s in 1 2 3; do
  timeout ${BUDGET:-170} python3 benchmarks/bench_finetune.py --gpu --seed $s --data /tmp/data/scifact --work /tmp/bf/seed$s-kd --only shipped_hybrid_long_kd > $OUT/pack/bf-kd-$s.log 2>&1 &
done
wait; echo "done at $(( $(date +%s) - t0 )) s" > $OUT/pack/where.txt
tar -czf $OUT/pack/bf.tgz --exclude='*.export' --exclude=checkpoints --exclude=cache /tmp/bf/seed1-kd /tmp/bf/seed2-kd /tmp/bf/seed3-kd 2>/dev/null
tar -C $OUT -czf $OUT/all.tgz pack && rm -rf $OUT/pack
