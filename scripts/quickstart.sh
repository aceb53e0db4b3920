#!/usr/bin/env bash
# Offline quickstart on a CPU: sets up .venv, trains the prototype classifier on scikit-learn's 8x8 digits,
# trains ProtoDiffusion (proto_frozen) on them for about 1000 steps, samples 500 images with a class grid, and
# scores them (proto-FID and class accuracy) with a second classifier trained with another seed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT:-results/quickstart}
mkdir -p "$OUT"
if [ ! -f "$OUT/classifier.pt" ]; then
  $PY train_classifier.py --dataset digits --pretrained False --epoch 15 --out "$OUT/classifier.pt"
fi
if [ ! -f "$OUT/eval_classifier.pt" ]; then
  $PY train_classifier.py --dataset digits --pretrained False --epoch 15 --seed 1 --out "$OUT/eval_classifier.pt"
fi
# 1797 images / 64 = 28 steps per epoch; 36 epochs ~ 1000 steps; lr 4e-4 x multiplier 2.5 peaks at 1e-3
$PY train.py --dataset digits --mode proto_frozen --path_proto "$OUT/classifier.pt" \
  --modch 64 --chmul 1,2 --numres 1 --batchsize 64 --lr 4e-4 --epoch 36 --ema_decay 0.999 \
  --ddim True --num_steps 20 --genbatch 100 --sample_every 12 --interval 12 --log_every 56 --results "$OUT"
run=$(ls -td "$OUT"/proto_frozen/digits/*/ | head -n 1)
$PY sample.py --path "$run" --epoch 36 --ddim True --num_steps 20 --genum 500 --genbatch 100 --fid True \
  --fid_features classifier --eval_classifier "$OUT/eval_classifier.pt" --data_root "$OUT/data" --out "${run}samples_36"
echo "training grid (EMA, one digit class per row, 0 at the top): ${run}samples/grid_36.png"
echo "500 samples: ${run}samples_36/, their grid: ${run}samples_36_grid.png"
