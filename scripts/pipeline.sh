#!/usr/bin/env bash
# The full pipeline for one dataset on every GPU of this machine (or NGPU of them):
# prototype classifier -> regular, proto_frozen, proto_unfrozen and the two controls (same seed, same budget)
# -> FID of every saved epoch (one sample.py process per arm) -> one FID-vs-epoch plot. Called by cifar10.sh,
# stl10.sh and tiny_imagenet.sh, which set the dataset's defaults; every setting below can be overridden from the
# environment.
# `--dry-run` prints the exact commands without running them.
# Rerunnable: after a failure or a preemption the same command goes on where it stopped (finished classifiers are
# kept, each arm continues from its newest checkpoint, epochs already scored with the same settings are skipped).
# LAUNCH replaces the launcher (scripts/slurm.sbatch sets srun + a multi-node torchrun); NGPU is then the total
# number of processes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
: "${DATASET:?set DATASET}"
NGPU=${NGPU:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
[ "$NGPU" -gt 0 ] || NGPU=1
OUT=${OUT:-results/$DATASET}
EPOCHS=${EPOCHS:-1500}            # the paper code's default
INTERVAL=${INTERVAL:-50}          # checkpoint (and FID) every INTERVAL epochs
EARLY=${EARLY-1,2,4,8,16,32}      # and at these early epochs, log-spaced (the paper's claim is about early training)
KEEP_LAST=${KEEP_LAST:-2}         # full training states kept (resume); every saved epoch keeps its sampling weights
GLOBAL_BATCH=${GLOBAL_BATCH:-256}  # the paper's 4 GPUs x 64, on any GPU count (micro-batches accumulate)
BATCH=${BATCH:-$(( GLOBAL_BATCH / NGPU < 64 ? GLOBAL_BATCH / NGPU : 64 ))}  # per GPU and micro-batch
IMAGE_SIZE=${IMAGE_SIZE:-32}
CHMUL=${CHMUL:-1,2,4,4}
LR=${LR:-2e-4}
SEED=${SEED:-0}
GENUM=${GENUM:-10000}             # images per FID
PER_CLASS=${PER_CLASS:-False}     # True: also each class's FID (GENUM / classes images each; a 2048-d sqrtm per class)
CLS_EPOCHS=${CLS_EPOCHS:-30}
MODES=${MODES:-"regular proto_frozen proto_unfrozen random_scaled proto_shuffled"}
DATA_ROOT=${DATA_ROOT:-datasets}
EXTRA=${EXTRA:-}                  # e.g. "--tiny_imagenet_path /data/tiny-imagenet-200"
COMPAT=${COMPAT:-none}            # original: what the authors' code ran (train.py --compat; sample.py follows the run)
WEIGHTS=EMA
[[ ",$COMPAT," == *,original,* || ",$COMPAT," == *,raw_weights,* ]] && WEIGHTS=raw
PY=${PY:-.venv/bin/python}
RUN=${LAUNCH:-"$PY -m torch.distributed.run --standalone --nproc_per_node=$NGPU"}

run() {
  echo "+ $*"
  if [ "$DRY" = 0 ]; then eval "$@"; fi
}

# a classifier is written once, at its end (atomically): a rerun keeps it
classifier() {
  if [ -f "$1" ]; then echo "# kept $1"; else run "$RUN train_classifier.py $2 --out $1"; fi
}

# what one arm costs, from rates measured on one H200 (2026-11-26, docs/gpu.md: 1,596 img/s training the paper UNet
# at 32x32, 96 img/s DDIM-50 sampling at genbatch 1000) scaled by pixels, and from the file sizes of the paper UNet
# (chmul 1,2,4,4: 452.2 MB full state, 113.0 MB weights file); estimates, not measurements
estimate() {
  local images saves
  images=$(case $DATASET in cifar10) echo 60000;; stl10) echo 13000;; tiny-imagenet) echo 100000;; *) echo 0;; esac)
  saves=$((EPOCHS / INTERVAL))
  if [ $((EPOCHS % INTERVAL)) -ne 0 ]; then saves=$((saves + 1)); fi  # the last epoch is always saved
  for e in ${EARLY//,/ }; do
    if [ $((e % INTERVAL)) -ne 0 ] && [ "$e" -lt "$EPOCHS" ]; then saves=$((saves + 1)); fi
  done
  awk -v e="$EPOCHS" -v n="$images" -v s="$IMAGE_SIZE" -v k="$saves" -v g="$GENUM" -v keep="$KEEP_LAST" -v arms="$(echo $MODES | wc -w)" 'BEGIN {
    px = (s / 32) ^ 2; train = e * n / (1596 / px) / 3600; score = k * g / (96 / px) / 3600
    disk = (k * 113.0 + (keep < k ? keep : k) * 452.2) / 1000
    printf "# estimate per arm: training %.1f GPU-h, scoring %d epochs %.1f GPU-h, disk %.1f GB; all %d arms: %.0f GPU-h, %.0f GB\n", train, k, score, disk, arms, arms * (train + score), arms * disk }'
}
estimate
[ "$DRY" = 1 ] || source scripts/setup.sh
CLS="--dataset $DATASET --data_root $DATA_ROOT --image_size $IMAGE_SIZE --epoch $CLS_EPOCHS $EXTRA"
classifier "$OUT/prototypes.pt" "$CLS --seed $SEED"
classifier "$OUT/eval_classifier.pt" "$CLS --seed $((SEED + 1))"
for mode in $MODES; do
  run "$RUN train.py --dataset $DATASET --data_root $DATA_ROOT --image_size $IMAGE_SIZE --chmul $CHMUL --cdim 128 --batchsize $BATCH --global_batch $GLOBAL_BATCH --lr $LR --epoch $EPOCHS --interval $INTERVAL --sample_every $INTERVAL --ddim True --seed $SEED --mode $mode --path_proto $OUT/prototypes.pt --run_dir $OUT/runs/$mode --if_exists continue --keep_last $KEEP_LAST${EARLY:+ --save_epochs $EARLY} --compat $COMPAT $EXTRA"
  # every saved epoch in one process: the network compiles once, Inception and the reference load once
  run "$RUN sample.py --path $OUT/runs/$mode --epoch all --ddim True --num_steps 50 --genum $GENUM --genbatch 250 --fid True --per_class $PER_CLASS --skip_scored True --data_root $DATA_ROOT"
done
runs=""
for mode in $MODES; do runs="$runs $OUT/runs/$mode"; done
run "$PY plot_fid.py$runs --out $OUT/fid_vs_epoch.png --title '$DATASET: FID (Inception, $GENUM images, DDIM-50, $WEIGHTS) vs epoch'"
