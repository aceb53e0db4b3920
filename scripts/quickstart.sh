#!/usr/bin/env bash
# Offline quickstart on a CPU: sets up .venv, trains the prototype classifier on scikit-learn's 8x8 digits,
# trains ProtoDiffusion (proto_frozen) on them for 700 steps, samples 500 images with a class grid, and scores
# them (proto-FID and class accuracy) with a second classifier trained with another seed.
# Budgets are cut to what the quality needs, so that it fits 10 minutes on a 2-core CPU without AVX-512
# (README, Quickstart time): the classifiers' test accuracy plateaus at 93-95% from about epoch 6 of 15, and the
# quickstart UNet's samples pass 95% class accuracy well before 700 steps.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT:-results/quickstart}
mkdir -p "$OUT"
if [ ! -f "$OUT/classifier.pt" ]; then
  $PY train_classifier.py --dataset digits --pretrained False --epoch 8 --out "$OUT/classifier.pt"
fi
if [ ! -f "$OUT/eval_classifier.pt" ]; then
  $PY train_classifier.py --dataset digits --pretrained False --epoch 8 --seed 1 --out "$OUT/eval_classifier.pt"
fi
# 1797 images / 64 = 28 steps per epoch; 25 epochs = 700 steps; lr 4e-4 x multiplier 2.5 peaks at 1e-3
$PY train.py --dataset digits --mode proto_frozen --path_proto "$OUT/classifier.pt" \
  --modch 64 --chmul 1,2 --numres 1 --batchsize 64 --lr 4e-4 --epoch 25 --ema_decay 0.999 \
  --ddim True --num_steps 20 --genbatch 100 --sample_every 25 --interval 25 --log_every 70 --results "$OUT"
run=$(ls -td "$OUT"/proto_frozen/digits/*/ | head -n 1)
$PY sample.py --path "$run" --epoch 25 --ddim True --num_steps 20 --genum 500 --genbatch 100 --fid True \
  --fid_features classifier --eval_classifier "$OUT/eval_classifier.pt" --data_root "$OUT/data" --out "${run}samples_25"
echo "training grid (EMA, one digit class per row, 0 at the top): ${run}samples/grid_25.png"
echo "500 samples: ${run}samples_25/, their grid: ${run}samples_25_grid.png"
