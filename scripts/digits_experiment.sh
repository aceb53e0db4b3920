#!/usr/bin/env bash
# The paper's claim on the offline digits set, CPU only: regular vs proto_frozen vs proto_unfrozen and the two
# controls (random_scaled, proto_shuffled), SEEDS seeds each, the same steps; proto-FID and class accuracy of
# EMA samples every EVAL_EVERY epochs, scored by a classifier trained with another seed than the prototypes'.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT:-results/digits_experiment}
SEEDS=${SEEDS:-"0 1 2"}
MODES=${MODES:-"regular proto_frozen proto_unfrozen random_scaled proto_shuffled"}
EPOCHS=${EPOCHS:-21}          # 28 steps per epoch at batch 64: 588 steps, where the modes can still differ
EVAL_EVERY=${EVAL_EVERY:-3}
JOBS=${JOBS:-2}               # runs side by side, one thread each
mkdir -p "$OUT/runs"
[ -f "$OUT/prototypes.pt" ] || $PY train_classifier.py --dataset digits --pretrained False --seed 0 --out "$OUT/prototypes.pt"
[ -f "$OUT/eval_classifier.pt" ] || $PY train_classifier.py --dataset digits --pretrained False --seed 1 --out "$OUT/eval_classifier.pt"
start=$(date +%s)
for seed in $SEEDS; do for mode in $MODES; do
  [ -d "$OUT/runs/$mode-s$seed" ] && continue
  echo "$PY train.py --dataset digits --mode $mode --path_proto $OUT/prototypes.pt --seed $seed \
    --modch 32 --chmul 1,2 --numres 1 --batchsize 64 --lr 4e-4 --epoch $EPOCHS --ema_decay 0.999 \
    --ddim True --num_steps 20 --genbatch 100 --sample_every $EPOCHS --interval $EPOCHS --log_every 28 \
    --fid_every $EVAL_EVERY --fid_num 200 --fid_features classifier --eval_classifier $OUT/eval_classifier.pt \
    --data_root $OUT/data --run_dir $OUT/runs/$mode-s$seed > $OUT/runs/$mode-s$seed.log 2>&1"
done; done | OMP_NUM_THREADS=$((2 / JOBS > 0 ? 2 / JOBS : 1)) xargs -P "$JOBS" -I{} bash -c {}
echo "runs took $(( $(date +%s) - start )) s"
$PY experiment_report.py "$OUT"/runs/*/ --out "$OUT"
