#!/usr/bin/env bash
# Why prototypes do or do not help on the offline digits set (CPU only): direction and scale of the class table,
# separated. Five arms, each seed shared by all of them, the same steps and evaluation:
#   regular                             random N(0, 1) table, trained (the baseline)
#   proto_frozen                        prototype directions at the prototypes' norms (the paper's table)
#   proto_frozen --proto_norm default   prototype directions at the regular table's expected row norm
#   random_scaled                       random directions at the prototypes' norms
#   random_scaled --proto_norm default  random directions at the regular table's expected row norm
# proto-FID and class accuracy of EMA samples every EVAL_EVERY epochs, scored by a classifier trained with another
# seed than the prototypes'; experiment_report.py adds the differences to regular paired by seed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT:-results/digits_experiment}
SEEDS=${SEEDS:-"0 1 2 3 4"}
ARMS=${ARMS:-"regular proto_frozen proto_frozen:default random_scaled random_scaled:default"}  # MODE[:PROTO_NORM]
EPOCHS=${EPOCHS:-21}          # 28 steps per epoch at batch 64: 588 steps, where the arms can still differ
EVAL_EVERY=${EVAL_EVERY:-3}
JOBS=${JOBS:-2}               # runs side by side, one thread each
mkdir -p "$OUT/runs"
[ -f "$OUT/prototypes.pt" ] || $PY train_classifier.py --dataset digits --pretrained False --seed 0 --out "$OUT/prototypes.pt"
[ -f "$OUT/eval_classifier.pt" ] || $PY train_classifier.py --dataset digits --pretrained False --seed 1 --out "$OUT/eval_classifier.pt"
start=$(date +%s)
for seed in $SEEDS; do for arm in $ARMS; do
  mode=${arm%%:*}; norm=keep; [ "$arm" != "$mode" ] && norm=${arm#*:}
  name=$mode$([ "$norm" = keep ] || echo "-norm_$norm")-s$seed
  [ -d "$OUT/runs/$name" ] && continue
  echo "$PY train.py --dataset digits --mode $mode --proto_norm $norm --path_proto $OUT/prototypes.pt --seed $seed \
    --modch 32 --chmul 1,2 --numres 1 --batchsize 64 --lr 4e-4 --epoch $EPOCHS --ema_decay 0.999 \
    --ddim True --num_steps 20 --genbatch 100 --sample_every $EPOCHS --interval $EPOCHS --log_every 28 \
    --fid_every $EVAL_EVERY --fid_num 200 --fid_features classifier --eval_classifier $OUT/eval_classifier.pt \
    --data_root $OUT/data --run_dir $OUT/runs/$name > $OUT/runs/$name.log 2>&1"
done; done | OMP_NUM_THREADS=$((2 / JOBS > 0 ? 2 / JOBS : 1)) xargs -P "$JOBS" -I{} bash -c {}
echo "runs took $(( $(date +%s) - start )) s"
$PY experiment_report.py "$OUT"/runs/*/ --out "$OUT"
