#!/usr/bin/env bash
# Sweep train.py's own step (bench.py --rows train) on the paper's CIFAR10 UNet over batch size and compile scope,
# within a time budget; prints one table (img/s, TFLOP/s against the measured bf16 matmul and the datasheet,
# compile time, memory) and writes GPU_TUNE_OUT/tune.json and summary.txt, nothing else (each row's JSON and log go to
# GPU_TUNE_WORK, default /tmp/gpu_tune_work: the device tool brings back at most 8 files).
#   bash scripts/gpu_tune.sh                 # at most BUDGET=400 s of rows, then the table
#   SWEEP=sample bash scripts/gpu_tune.sh    # the same for guided DDIM-50 sampling over --genbatch
# Every configuration is its own graph, so each row pays one compile, cold unless gpu_check.sh (or an earlier
# tune) compiled it into the same inductor cache (TORCHINDUCTOR_CACHE_DIR, shared with gpu_check.sh). The grid
# is sized for about 120 s per cold compile (the paper UNet on an H200); rows run in priority order, and a row that
# would start with under MIN_ROW s of budget left is listed as skipped.
# Without a GPU it runs a small grid of tiny eager configs (compiling costs minutes on a CPU), to check the plumbing.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${GPU_TUNE_OUT:-results/gpu_tune}
WORK=${GPU_TUNE_WORK:-/tmp/gpu_tune_work}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
BUDGET=${BUDGET:-400}
MIN_ROW=${MIN_ROW:-45}
SWEEP=${SWEEP:-train}
mkdir -p "$OUT" "$WORK"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/gpu_check_work/inductor}
rm -f "$WORK"/row_*.json "$WORK"/row_*.log "$WORK"/rows.tsv
CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))")

if [ "$CUDA" = 1 ]; then
  MODEL="--modch 64 --chmul 1,2,4,4 --numres 2 --image_size 32 --steps 20 --warmup 5 --sample_timed_steps 10"
  COMPILE=True
  # batch  compile mode  channels_last  scope; most informative first (batch 128 whole is gpu_check's bench row,
  # so its compile is warm); reduce-overhead replays CUDA graphs (the step's gradients and the sampler's steps are
  # made for them); regional compiles only the UNet's blocks: a faster start, steps to be measured
  GRID=("128 default True whole" "128 reduce-overhead True whole" "256 default True whole"
        "128 default True regional")
  [ "$SWEEP" = sample ] && GRID=("256 default True whole" "256 reduce-overhead True whole" "1024 default True whole"
                                 "1024 reduce-overhead True whole")
else
  MODEL="--modch 32 --chmul 1,2 --numres 1 --image_size 16 --steps 2 --warmup 1 --sample_timed_steps 1"
  COMPILE=False
  GRID=("4 default True whole" "8 default True whole" "4 default False whole")
fi
if [ "$SWEEP" = sample ]; then ROWS="--rows sample --batchsize 8 --sample_batch"; else ROWS="--rows train --batchsize"; fi

t0=$SECONDS
i=0
for row in "${GRID[@]}"; do
  read -r batch mode cl scope <<<"$row"
  left=$((BUDGET - (SECONDS - t0)))
  if [ "$left" -lt "$MIN_ROW" ]; then
    printf '%s\t%s\t%s\t%s\t%s\tskipped: %s s of the budget left\n' "$i" "$batch" "$mode" "$cl" "$scope" "$left" \
      >>"$WORK/rows.tsv"
  else
    echo "== row $i: batch $batch, compile $COMPILE ($mode, $scope), channels_last $cl (limit ${left} s)"
    timeout --kill-after=10 "$left" $PY bench.py $MODEL $ROWS "$batch" --compile "$COMPILE" \
      --compile_mode "$mode" --compile_scope "$scope" --channels_last "$cl" --json >"$WORK/row_$i.json" \
      2>"$WORK/row_$i.log"
    rc=$?
    printf '%s\t%s\t%s\t%s\t%s\trc %s\n' "$i" "$batch" "$mode" "$cl" "$scope" "$rc" >>"$WORK/rows.tsv"
  fi
  i=$((i + 1))
done
$PY scripts/gpu_check_report.py tune "$OUT" "$WORK"
