#!/usr/bin/env bash
# GPU acceptance in one command (docs/gpu.md), for a bare image (torch >= 2.6, no pytorch-fid, no network), steps in
# the order of what a short GPU window is worth:
#   preflight  imports of every entry point, versions, free memory, the C++ compiler
#   train      a 2-rank DDP + compile torchrun run (gloo, so that both ranks share one GPU) that stops mid-epoch ...
#   resume     ... and goes on with --path_resume to its last epoch (train.py's own img/s: its metrics.jsonl)
#   sample     sample.py --fid on that run at its grid's batch, so its sampling network compiles warm (img/s)
#   bench      bench.py at the paper's CIFAR10 config (eager, the compiled step, train.py's own loop), with a profile
#   tests      the CUDA tests (compiled loss graph, Philox on CUDA, the sampler's fast path, ...)
# Each step's limit is a function of C, the cold compile of the paper UNet's training step (COMPILE_S, 120 s on
# CUDA by default, the 2026-11-26 H200 figure), cut to what is left of BUDGET (540 s). report.json and summary.txt
# in GPU_CHECK_OUT are rewritten after every step, so a check cut short keeps every earlier number. Exits non-zero
# if any check fails or a compile fell back to eager. Without a GPU the same steps run on tiny configs (the CUDA
# tests skip), to check the plumbing.
#   GPU_CHECK_OUT=$OUT bash scripts/gpu_check.sh    # at most 9 minutes
#   bash scripts/gpu_check.sh --plan 120            # each step's limit for C = 120 s, and their sum
#   ONLY=bench,sample bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# the limits: L_name = base + C / div, in the order the steps run (the plan for C = 120 s sums to 500 of 540 s)
limit() {  # limit NAME C
  case $1 in
    preflight) echo 30 ;;
    train) echo $((40 + $2 / 2)) ;;    # two ranks compile the smaller UNet's loss (about C/2) at once
    resume) echo $((30 + $2 / 2)) ;;   # the loss warm from the shared cache; the final grid compiles the sampler
    sample) echo 40 ;;                 # the grid's sampling network again: warm
    bench) echo $((50 + $2)) ;;        # the paper UNet's step, cold; train.py's loop row reuses its graph
    tests) echo $((40 + $2 / 4)) ;;    # small graphs of their own
  esac
}
STEPS="preflight train resume sample bench tests"
if [ "${1:-}" = "--plan" ]; then
  BUDGET=${BUDGET:-540}
  C=${2:-120}; total=0
  for name in $STEPS; do l=$(limit $name "$C"); total=$((total + l)); printf '%-9s %4s s\n' "$name" "$l"; done
  printf '%-9s %4s s of a %s s budget (C = %s s)\n' total "$total" "$BUDGET" "$C"
  [ "$total" -le "$BUDGET" ]; exit
fi
OUT_DIR=${GPU_CHECK_OUT:-results/gpu_check}
WORK=${GPU_CHECK_WORK:-$OUT_DIR/work}
ONLY=${ONLY:-preflight,train,sample,bench,tests}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$OUT_DIR" "$WORK"
rm -rf "$WORK"/run "$WORK"/steps.tsv "$OUT_DIR"/report.json
export PYTHONUNBUFFERED=1
# one inductor cache for the whole check: the resume, the sample step and bench's loop row reuse earlier graphs
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}

# pytorch-fid from wheels in .whl/ when the machine lacks it and has no network (docs/gpu.md)
if ! $PY -c "import pytorch_fid" 2>/dev/null && ls .whl/pytorch_fid-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target "$WORK/site" .whl/pytorch_fid-*.whl \
    && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
HAVE_FID=$($PY -c "import pytorch_fid" 2>/dev/null && echo 1 || echo 0)
CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

# on CPU (plumbing only, often beside other jobs) every limit and the budget are tripled
SCALE=$([ "$CUDA" = 1 ] && echo 1 || echo 3)
BUDGET=${BUDGET:-$((540 * SCALE))}
if [ "$CUDA" = 1 ]; then
  C=${COMPILE_S:-120}
  # the paper's CIFAR10 UNet: mod_ch 64, ch_mul 1,2,4,4, 2 res blocks, cdim 128, 32x32
  BENCH="--modch 64 --chmul 1,2,4,4 --image_size 32 --batchsize 128 --steps 10 --warmup 3 --loop_steps 40
    --rows train_eager,train,loop"
  # a smaller UNet than the paper's for the run that stops and resumes: two ranks compile it at once
  EPOCHS=10; TRAIN="--modch 64 --chmul 1,2,2 --numres 1 --image_size 32 --batchsize 64 --epoch $EPOCHS"
  GRID_BATCH=100
  STOP=63  # 14 steps per epoch of 2 x 64: stop 7 steps into epoch 5, resume to step 140
  LOSS_MAX=0.15  # the paper's UNet reached 0.022 by step 280 at batch 128 on an H200 (docs/gpu.md); untrained ~1
  GENUM=${GENUM:-2000}
else
  # plumbing only: the 2-rank compile test's model and grid (tests/test_gpu_check.py, 8x8 digits), so its compiles are
  # the suite's; the tripled limits cover that cold 2-rank compile (50-65 s here) on a loaded 2-core machine
  C=${COMPILE_S:-120}
  BENCH="--modch 32 --chmul 1,2 --numres 1 --image_size 16 --batchsize 8 --steps 2 --warmup 1 --sample_timed_steps 2
    --loop_steps 8 --rows train_eager,train,loop"
  EPOCHS=4; TRAIN="--modch 32 --chmul 1 --numres 1 --batchsize 64 --epoch $EPOCHS"; GRID_BATCH=10
  STOP=20  # 14 steps per epoch of 2 x 64: 6 steps into epoch 2
  LOSS_MAX=0.5  # 56 steps of a tiny UNet (CPU): it starts near 1
  GENUM=100  # Inception on 2 CPU cores takes minutes: proto-FID checks the same plumbing
fi
TORCHRUN="$PY -m torch.distributed.run --standalone"

T0=$SECONDS
report() { $PY scripts/gpu_check_report.py report "$OUT_DIR" "$WORK" "$GENUM" "$LOSS_MAX" "$C" "$1" > /dev/null; }
step() {  # step NAME CMD...: run under min(its limit, budget left), log to OUT_DIR/NAME.log, then rewrite the report
  local name=$1; shift
  local limit left=$((BUDGET - (SECONDS - T0)))
  limit=$(($(limit "$name" "$C") * SCALE))
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "== $name (limit $limit s): $*"
  if [ "$limit" -lt 5 ]; then
    echo "budget of $BUDGET s spent before this step" >"$OUT_DIR/$name.log"; local rc=124
  else
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1; local rc=$?
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >>"$WORK/steps.tsv"
  echo "   rc $rc, $((SECONDS - t0)) s"
  report partial
}
echo "compile time C = $C s sets the limits (bash scripts/gpu_check.sh --plan $C)"

case ",$ONLY," in *,preflight,*)
  step preflight $PY scripts/gpu_check_report.py preflight "$WORK" ;;
esac
$PY scripts/gpu_check_report.py random-scorers "$WORK"  # nothing downloads: random Inception / classifier weights
FEATURES="--fid_features classifier --eval_classifier $WORK/random_classifier.pt"
[ "$CUDA" = 1 ] && [ "$HAVE_FID" = 1 ] && FEATURES="--inception_weights $WORK/random_inception.pth"
case ",$ONLY," in *,train,*)
  # gloo lets the two ranks share one GPU (NCCL refuses two ranks on one device); on CPU it is the default
  step train $TORCHRUN --nproc_per_node=2 train.py --dataset digits $TRAIN --max_steps $STOP \
    --run_dir "$WORK/run" --dist_backend gloo --compile True --ddim True --num_steps 20 --genbatch $GRID_BATCH \
    --sample_every 1000 --interval 5 --log_every 7 ${TRAIN_EXTRA:-}
  step resume $TORCHRUN --nproc_per_node=2 train.py --path_resume "$WORK/run" --dist_backend gloo ;;
esac
case ",$ONLY," in *,sample,*)
  # the trained run's last epoch at the grid's batch and sampler settings: the sampling network's graph is warm
  step sample $TORCHRUN --nproc_per_node=1 sample.py --path "$WORK/run" --epoch $EPOCHS --ddim True --num_steps 20 \
    --genum $GENUM --genbatch $GRID_BATCH --compile True --fid True $FEATURES --data_root "$WORK/data" --png False ;;
esac
case ",$ONLY," in *,bench,*)
  step bench $PY bench.py $BENCH --profile "$OUT_DIR/profile" --json ;;
esac
case ",$ONLY," in *,tests,*)
  step tests $PY -m pytest -q -rs -s tests/test_cuda.py tests/test_train_step.py -k "cuda or sync" ;;
esac
$PY scripts/gpu_check_report.py report "$OUT_DIR" "$WORK" "$GENUM" "$LOSS_MAX" "$C" final
