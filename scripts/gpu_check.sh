#!/usr/bin/env bash
# GPU acceptance in two device calls (docs/gpu.md), for a bare image (torch >= 2.7, no pytorch-fid, no network), the
# first holding what a short GPU window is worth most:
#   call 1  preflight  versions, every entry point importable, free memory, the C++ compiler or triton
#           train      train.py on one GPU (torchrun, NCCL, compile) at the paper's CIFAR10 UNet, stopped mid-epoch ...
#           resume     ... and continued to its last epoch (its own img/s in its metrics.jsonl; its grid compiles the
#                      sampling step)
#           sample     sample.py --fid on that run, the sampling step warm
#           bench      bench.py's training rows at the same config (eager; the compiled step, warm)
#   call 2  preflight, then bench's sampling rows (eager; the compiled guided DDIM step) and the profile of the
#           training step, then the CUDA tests (the compiled step's gradients against eager's among them)
# Each step's limit is a function of C, the cold compile of the paper UNet's training step (COMPILE_S, 120 s on
# CUDA by default, the 2026-11-26 H200 figure), cut to what is left of the call's BUDGET (240 s). Everything a step
# writes goes to GPU_CHECK_WORK (default /tmp/gpu_check_work); GPU_CHECK_OUT (the device's $OUT) gets at most six
# small files and no folder, rewritten after every step, so a call cut short keeps every earlier number:
# report.json, summary.txt, logs.txt (the last lines of each step's log), and from call 1 the run's metrics.jsonl and
# compile_cache.bin (the compiles of call 1, for call 2: GPU_CHECK_CACHE=FILE), from call 2 top_ops.txt. Exits
# non-zero if any check fails or a compile fell back to eager. Without a GPU the same steps run on tiny configs
# (train and resume on 2 gloo ranks, DDP; the CUDA tests skip), to check the plumbing.
#   GPU_CHECK_OUT=$OUT bash scripts/gpu_check.sh --call 1
#   GPU_CHECK_OUT=$OUT GPU_CHECK_CACHE=gpu_cache/compile_cache.bin bash scripts/gpu_check.sh --call 2
#   bash scripts/gpu_check.sh --plan 120            # each call's step limits for C = 120 s, and their sums
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
limit() {  # limit CALL NAME C: base + C / div, in the order the steps run
  case $1:$2 in
    *:preflight) echo 15 ;;
    1:train) echo $((10 + $3)) ;;        # the paper UNet's loss, cold, and its steps
    1:resume) echo $((15 + $3 / 4)) ;;   # the loss warm from the inductor cache; the final grid's sampling step
    1:sample) echo 25 ;;                 # the sampling step again: warm
    1:bench) echo 25 ;;                  # eager rows, and the compiled step: the run's graph, warm
    2:bench) echo $((30 + $3 / 2)) ;;    # the guided DDIM step at bench's batch, cold; the profiled step warm
    2:tests) echo $((60 + $3 / 2)) ;;    # small graphs of their own (6 of them took 77 s on the H200)
  esac
}
steps_of() { [ "$1" = 1 ] && echo "preflight train resume sample bench" || echo "preflight bench tests"; }
if [ "${1:-}" = "--plan" ]; then
  C=${2:-120}; fits=0
  for call in 1 2; do
    total=0
    for name in $(steps_of $call); do
      l=$(limit $call $name "$C"); total=$((total + l)); printf 'call %s %-9s %4s s\n' $call $name "$l"
    done
    printf 'call %s total     %4s s of a %s s budget (C = %s s)\n' $call "$total" "${BUDGET:-240}" "$C"
    [ "$total" -le "${BUDGET:-240}" ] || fits=1
  done
  exit $fits
fi
if [ "${1:-}" != "--call" ] || [[ ! "${2:-}" =~ ^[12]$ ]]; then
  echo "usage: gpu_check.sh --call 1|2, or --plan C" >&2; exit 2
fi
CALL=$2
OUT_DIR=${GPU_CHECK_OUT:-results/gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$OUT_DIR" "$WORK"
rm -rf "$WORK"/steps.tsv "$WORK"/logs "$OUT_DIR"/{report.json,summary.txt,logs.txt,metrics.jsonl,top_ops.txt}
[ "$CALL" = 1 ] && rm -rf "$WORK"/run "$OUT_DIR"/compile_cache.bin
mkdir -p "$WORK"/logs
export PYTHONUNBUFFERED=1
# one inductor cache for the call: the resume, the sample step and bench's rows reuse the run's graphs
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
BUDGET=${BUDGET:-$((240 * SCALE))}
C=${COMPILE_S:-120}
if [ "$CUDA" = 1 ]; then
  # the paper's CIFAR10 UNet (mod_ch 64, ch_mul 1,2,4,4, 2 res blocks, cdim 128) at 32x32, batch 128: the run and
  # bench's training rows compile the same graph
  MODEL="--inch 1 --modch 64 --chmul 1,2,4,4 --numres 2 --cdim 128 --image_size 32 --batchsize 128"
  EPOCHS=2; STOP=20  # 14 steps per epoch (1797 digits / 128): stop 6 steps into epoch 2, resume to step 28
  RANKS=1; BACKEND=nccl; GRID_BATCH=100; LOSS_MAX=0.5  # an untrained UNet's loss is near 1
  BENCH_TRAIN="--steps 10 --warmup 3 --rows train_eager,train"
  BENCH_SAMPLE="--steps 5 --warmup 2 --sample_batch 256 --sample_timed_steps 10 --rows train,sample_eager,sample"
  GENUM=${GENUM:-2000}
else
  # plumbing only: a tiny UNet on 8x8 digits on 2 gloo ranks (DDP), whose compiles the suite reuses
  # (tests/test_gpu_check.py)
  MODEL="--inch 1 --modch 32 --chmul 1 --numres 1 --cdim 128 --image_size 8 --batchsize 64"
  EPOCHS=2; STOP=20  # 14 steps per epoch of 2 x 64: stop 6 steps into epoch 2, resume to step 28
  RANKS=2; BACKEND=gloo; GRID_BATCH=10; LOSS_MAX=0.8
  BENCH_TRAIN="--steps 2 --warmup 1 --rows train_eager,train"
  BENCH_SAMPLE="--steps 2 --warmup 1 --sample_batch 10 --num_steps 3 --sample_timed_steps 2
    --rows train,sample_eager,sample"
  GENUM=100  # Inception on 2 CPU cores takes minutes: proto-FID checks the same plumbing
fi

T0=$SECONDS
report() {  # report partial|final: rewrite OUT_DIR's files from what the call has done so far
  $PY scripts/gpu_check_report.py report "$OUT_DIR" "$WORK" "$CALL" "$GENUM" "$LOSS_MAX" "$C" "$1"
}
step() {  # step NAME CMD...: run under min(its limit, budget left), log to WORK/logs/NAME.log, then report
  local name=$1; shift
  local limit left=$((BUDGET - (SECONDS - T0)))
  limit=$(($(limit "$CALL" "$name" "$C") * SCALE))
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "== $name (limit $limit s): $*"
  if [ "$limit" -lt 5 ]; then
    echo "budget of $BUDGET s spent before this step" >"$WORK/logs/$name.log"; local rc=124
  else
    timeout --kill-after=10 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1; local rc=$?
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >>"$WORK/steps.tsv"
  echo "   rc $rc, $((SECONDS - t0)) s"
  report partial >/dev/null
}
echo "call $CALL; compile time C = $C s sets the limits (bash scripts/gpu_check.sh --plan $C)"

step preflight $PY scripts/gpu_check_report.py preflight "$WORK"
if [ "$CALL" = 1 ]; then
  $PY scripts/gpu_check_report.py random-scorers "$WORK"  # nothing downloads: random Inception / classifier weights
  FEATURES="--fid_features classifier --eval_classifier $WORK/random_classifier.pt"
  [ "$CUDA" = 1 ] && [ "$HAVE_FID" = 1 ] && FEATURES="--inception_weights $WORK/random_inception.pth"
  TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node"
  step train $TORCHRUN=$RANKS train.py --dataset digits $MODEL --epoch $EPOCHS --max_steps $STOP --run_dir "$WORK/run" \
    --dist_backend $BACKEND --compile True --ddim True --num_steps 20 --genbatch $GRID_BATCH --sample_every 1000 \
    --interval 1 --log_every 2
  step resume $TORCHRUN=$RANKS train.py --path_resume "$WORK/run" --dist_backend $BACKEND
  step sample $TORCHRUN=1 sample.py --path "$WORK/run" --epoch $EPOCHS --ddim True --num_steps 20 --genum $GENUM \
    --genbatch $GRID_BATCH --compile True --fid True $FEATURES --data_root "$WORK/data" --png False
  step bench $PY bench.py $MODEL $BENCH_TRAIN --json
  # a file over the device tool's 16 MiB would not come back: then call 2 compiles cold
  [ "$(stat -c %s "$WORK/run/compile_cache.bin" 2>/dev/null || echo $((1 << 30)))" -le $((15 << 20)) ] \
    && cp "$WORK/run/compile_cache.bin" "$OUT_DIR/"
else
  CACHE=${GPU_CHECK_CACHE:+--compile_cache $GPU_CHECK_CACHE}
  step bench $PY bench.py $MODEL $BENCH_SAMPLE $CACHE --profile "$WORK/profile" --json
  cp "$WORK/profile/top_ops.txt" "$OUT_DIR/" 2>/dev/null
  step tests $PY -m pytest -q -rs -s tests/test_cuda.py tests/test_train_step.py -k "cuda or sync"
fi
report final
