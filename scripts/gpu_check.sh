#!/usr/bin/env bash
# GPU acceptance in one command (docs/gpu.md), for a bare image (torch >= 2.6, no pytorch-fid, no network):
#   preflight  imports of every entry point, versions, free memory, the C++ compiler
#   warmup     bench.py compiles the paper's training step once; its compile time C sets the later step limits
#   tests      the CUDA tests (compiled loss graph, Philox on CUDA, the sampler's fast path, ...)
#   bench      bench.py at the paper's CIFAR10 config (eager, the step, train.py's own loop) with a profile
#   train      a 2-rank DDP + compile torchrun run (gloo, so that both ranks share one GPU) that stops ...
#   resume     ... and goes on with --path_resume
#   sample     sample.py --fid (Inception with random weights when pytorch-fid is there, proto-FID otherwise)
# Writes GPU_CHECK_OUT/report.json, summary.txt, one log per step and profile/; exits non-zero if any check fails,
# a compile fell back to eager, or the whole run would outlast BUDGET (540 s: each step's limit is cut to what is
# left). Without a GPU it runs the same steps on tiny configs (the CUDA tests skip), to check the plumbing.
#   bash scripts/gpu_check.sh            # at most 9 minutes
#   ONLY=bench,sample bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR=${GPU_CHECK_OUT:-results/gpu_check}
WORK=${GPU_CHECK_WORK:-results/gpu_check/work}
ONLY=${ONLY:-preflight,warmup,tests,bench,train,sample}
BUDGET=${BUDGET:-540}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$OUT_DIR" "$WORK"
rm -rf "$WORK"/run "$WORK"/random_run "$WORK"/steps.tsv "$WORK"/ranks
export PYTHONUNBUFFERED=1
# one inductor cache for the whole check: the warm-up's compile is reused by bench (same graph) and resumes
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}

# pytorch-fid from wheels in .whl/ when the machine lacks it and has no network (docs/gpu.md)
if ! $PY -c "import pytorch_fid" 2>/dev/null && ls .whl/pytorch_fid-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target "$WORK/site" .whl/pytorch_fid-*.whl \
    && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
HAVE_FID=$($PY -c "import pytorch_fid" 2>/dev/null && echo 1 || echo 0)
CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

if [ "$CUDA" = 1 ]; then  # the paper's CIFAR10 UNet: mod_ch 64, ch_mul 1,2,4,4, 2 res blocks, cdim 128, 32x32
  PAPER="--modch 64 --chmul 1,2,4,4 --image_size 32 --batchsize 128"
  WARMUP="$PAPER --rows train --steps 1 --warmup 0"
  BENCH="$PAPER --steps 10 --warmup 3 --loop_steps 40 --rows train_eager,train,loop"
  MODEL="--modch 64 --chmul 1,2,4,4 --numres 2 --image_size 32"
  # a smaller UNet than the paper's for the run that stops and resumes: two ranks compile it at once
  TRAIN="--modch 64 --chmul 1,2,2 --numres 1 --image_size 32 --batchsize 64 --epoch 10"; GRID_BATCH=40
  STOP=70  # 14 steps per epoch of 2 x 64: stop inside epoch 5, resume to step 140
  LOSS_MAX=0.15  # the paper's UNet reached 0.022 by step 280 at batch 128 on an H200 (docs/gpu.md); untrained ~1
  GENUM=${GENUM:-5000}; GENBATCH=1000; STEPS=50
else
  # the 2-rank compile test's model and grid (tests/test_ddp.py, 8x8 digits), so the suite's compiles are warm here
  TINY="--modch 32 --chmul 1 --numres 1"; GRID_BATCH=10
  # the warm-up's plumbing only: compiling costs a minute on a CPU, and the 2-rank step below compiles
  WARMUP="--inch 1 $TINY --image_size 8 --batchsize 64 --rows train --steps 1 --warmup 0 --compile False"
  BENCH="--modch 32 --chmul 1,2 --numres 1 --image_size 16 --batchsize 8 --steps 2 --warmup 1 --sample_timed_steps 2
    --loop_steps 8 --rows train_eager,train,loop"
  MODEL="--modch 32 --chmul 1,2 --numres 1 --image_size 16"
  TRAIN="$TINY --batchsize 64 --epoch 4"; STOP=20
  LOSS_MAX=0.5  # 56 steps of a tiny UNet (CPU): it starts near 1
  GENUM=100; GENBATCH=50; STEPS=5  # Inception on 2 CPU cores takes minutes: proto-FID checks the same plumbing
fi
if [ "$CUDA" = 1 ] && [ "$HAVE_FID" = 1 ]; then
  FEATURES="--inception_weights $WORK/random_inception.pth"
else
  FEATURES="--fid_features classifier --eval_classifier $WORK/random_classifier.pt"
fi
TORCHRUN="$PY -m torch.distributed.run --standalone"

T0=$SECONDS
COMPILE_S=0
step() {  # step NAME SECONDS CMD...: run under min(SECONDS, budget left), log to OUT_DIR/NAME.log, record rc + time
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - T0)))
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
}

case ",$ONLY," in *,preflight,*)
  step preflight 60 $PY scripts/gpu_check_report.py preflight "$WORK" ;;
esac
case ",$ONLY," in *,warmup,*)
  step warmup 300 $PY bench.py $WARMUP --json
  COMPILE_S=$($PY scripts/gpu_check_report.py compile-seconds "$OUT_DIR/warmup.log") ;;
esac
# on CPU the warm-up does not compile: C is the 2-rank step's cold compile measured there (65 s, docs/gpu.md)
[ "$CUDA" = 1 ] || COMPILE_S=90
C=${COMPILE_S%.*}
echo "   compile time C = ${C} s sets the limits below"
case ",$ONLY," in *,tests,*)
  step tests $((90 + C)) $PY -m pytest -q -rs -s tests/test_cuda.py tests/test_train_step.py -k "cuda or sync" ;;
esac
case ",$ONLY," in *,bench,*)
  step bench $((60 + C)) $PY bench.py $BENCH --profile "$OUT_DIR/profile" --json ;;
esac
case ",$ONLY," in *,train,*)
  # gloo lets the two ranks share one GPU (NCCL refuses two ranks on one device); on CPU it is the default
  step train $((60 + C)) $TORCHRUN --nproc_per_node=2 train.py --dataset digits $TRAIN --max_steps $STOP \
    --run_dir "$WORK/run" --dist_backend gloo --compile True --ddim True --num_steps 20 --genbatch $GRID_BATCH \
    --sample_every 5 --interval 5 --log_every 10 ${TRAIN_EXTRA:-}
  step resume $((40 + C / 2)) $TORCHRUN --nproc_per_node=2 train.py --path_resume "$WORK/run" --dist_backend gloo ;;
esac
case ",$ONLY," in *,sample,*)
  step sample $((60 + C)) bash -c "$PY scripts/gpu_check_report.py random-run $WORK $MODEL && \
    $TORCHRUN --nproc_per_node=1 sample.py --path $WORK/random_run --epoch 0 --ddim True --num_steps $STEPS \
    --genum $GENUM --genbatch $GENBATCH --fid True $FEATURES --data_root $WORK/data" ;;
esac
$PY scripts/gpu_check_report.py report "$OUT_DIR" "$WORK" "$GENUM" "$LOSS_MAX"
