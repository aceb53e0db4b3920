#!/usr/bin/env bash
# Do prototypes that carry class structure help? On the offline digits set (CPU only), five arms, each seed shared
# by all of them (same init, noise and data order; only the class table differs), the same steps and evaluation.
# Every table but regular's is frozen at the regular table's expected row norm (--proto_norm default):
#   regular        random N(0, 1) table, trained (the baseline)
#   centres        the classifier's DCE centres (--center_lr_mult 1: they barely move from their random init)
#   centres_lr100  the centres of a classifier trained with --center_lr_mult 100 (they move)
#   means          each class's mean classifier feature (--proto_source means)
#   random         random directions (--mode random_scaled)
# More arms for the earlier studies: centres_own_norm, random_own_norm (the tables at the centres' own norms),
# shuffled (centres of other classes), unfrozen (centres, trained), regular_padding_idx (the original's baseline:
# class 0's row at zero, untrained). Study 3 (docs/digits.md) is
#   OUT=results/digits_study3 ARMS="regular regular_padding_idx centres_own_norm centres" FID_NUM=1000 \
#     PER_CLASS=True bash scripts/digits_experiment.sh
# and its long baselines the same with OUT=results/digits_study3_long ARMS="regular regular_padding_idx" EPOCHS=63
# EVAL_EVERY=6.
# proto-FID and class accuracy of EMA samples every EVAL_EVERY epochs, scored by a classifier trained with another
# seed than the prototypes'; experiment_report.py adds the differences paired by seed to regular and to random,
# structure.py the class structure of every table, against the prototypes' classifier and the independent one.
# `--dry-run` prints the exact commands without running them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
[ $DRY = 1 ] || source scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT:-results/digits_experiment}
SEEDS=${SEEDS:-"0 1 2 3 4"}
ARMS=${ARMS:-"regular centres centres_lr100 means random"}
EPOCHS=${EPOCHS:-21}          # 28 steps per epoch at batch 64: 588 steps, where the arms can still differ
EVAL_EVERY=${EVAL_EVERY:-3}
FID_NUM=${FID_NUM:-200}       # EMA samples per evaluation, balanced over the 10 classes
PER_CLASS=${PER_CLASS:-False} # also each class's proto-FID and accuracy (experiment_report.py --class_index)
JOBS=${JOBS:-2}               # runs side by side, one thread each
CLASSIFIER_EPOCHS=${CLASSIFIER_EPOCHS:-15}
P=$OUT/prototypes.pt
arm_flags() {
  case $1 in
    regular) echo "--mode regular" ;;
    regular_padding_idx) echo "--mode regular --compat padding_idx" ;;
    centres) echo "--mode proto_frozen --proto_norm default --path_proto $P" ;;
    centres_lr100) echo "--mode proto_frozen --proto_norm default --path_proto $OUT/prototypes_lr100.pt" ;;
    means) echo "--mode proto_frozen --proto_norm default --proto_source means --path_proto $P" ;;
    random) echo "--mode random_scaled --proto_norm default --path_proto $P" ;;
    centres_own_norm) echo "--mode proto_frozen --path_proto $P" ;;
    random_own_norm) echo "--mode random_scaled --path_proto $P" ;;
    shuffled) echo "--mode proto_shuffled --path_proto $P" ;;
    unfrozen) echo "--mode proto_unfrozen --path_proto $P" ;;
    *) echo "error: unknown arm '$1' (see the top of $0)" >&2; exit 2 ;;
  esac
}
for arm in $ARMS; do arm_flags "$arm" > /dev/null; done
[ $DRY = 1 ] || mkdir -p "$OUT/runs"
classifier() {  # OUT_FILE SEED CENTER_LR_MULT
  local cmd="$PY train_classifier.py --dataset digits --pretrained False --epoch $CLASSIFIER_EPOCHS --seed $2 \
    --center_lr_mult $3 --data_root $OUT/data --out $1"
  if [ $DRY = 1 ]; then echo "+ $cmd"; elif [ ! -f "$1" ]; then $cmd > "${1%.pt}.log" 2>&1; fi
}
classifier "$P" 0 1
classifier "$OUT/eval_classifier.pt" 1 1
[[ " $ARMS " == *" centres_lr100 "* ]] && classifier "$OUT/prototypes_lr100.pt" 0 100
runs() {
for seed in $SEEDS; do for arm in $ARMS; do
  name=$arm-s$seed
  [ -d "$OUT/runs/$name" ] && continue
  echo "$PY train.py --dataset digits $(arm_flags "$arm") --seed $seed \
    --modch 32 --chmul 1,2 --numres 1 --batchsize 64 --lr 4e-4 --epoch $EPOCHS --ema_decay 0.999 \
    --ddim True --num_steps 20 --genbatch 100 --sample_every $EPOCHS --interval $EPOCHS --log_every 28 \
    --fid_every $EVAL_EVERY --fid_num $FID_NUM --per_class $PER_CLASS --fid_features classifier --eval_classifier $OUT/eval_classifier.pt \
    --data_root $OUT/data --run_dir $OUT/runs/$name > $OUT/runs/$name.log 2>&1"
done; done
}
if [ $DRY = 1 ]; then runs | sed 's/^/+ /; s/ > .*//'; exit 0; fi
start=$(date +%s)
runs | OMP_NUM_THREADS=$((2 / JOBS > 0 ? 2 / JOBS : 1)) xargs -P "$JOBS" -I{} bash -c {}
echo "runs took $(( $(date +%s) - start )) s"
baselines=(regular)
[[ " $ARMS " == *" random "* ]] && baselines+=("random_scaled @ norm default$([[ " $ARMS " == *" centres_lr100 "* ]] && echo " [prototypes]")")
$PY experiment_report.py "$OUT"/runs/*/ --out "$OUT" --baseline "${baselines[@]}"
for clf in prototypes eval_classifier; do
  $PY structure.py "$OUT"/prototypes*.pt "$OUT"/runs/*/ --classifier "$OUT/$clf.pt" --out "$OUT/structure_$clf.md"
done
