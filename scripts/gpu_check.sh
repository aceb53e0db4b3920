#!/usr/bin/env bash
# GPU acceptance in one command (docs/gpu.md): the CUDA tests, bench.py at the paper's CIFAR10 config (with
# train.py's own loop and a profile of the step), a torchrun training run on digits with the CUDA defaults that
# stops and resumes, and sample.py --fid for 5,000 images. Writes GPU_CHECK_OUT/report.json, summary.txt, one log
# per step and profile/; exits non-zero if any check fails. The step limits add up to 8 minutes.
# Pass thresholds: every step exits 0; the resumed run's last logged loss is below LOSS_MAX; the FID is finite
# and counts exactly GENUM images.
# Without a GPU it runs the same steps on tiny configs (the CUDA tests skip), to check the plumbing.
#   bash scripts/gpu_check.sh            # at most 8 minutes
#   ONLY=bench,sample bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR=${GPU_CHECK_OUT:-results/gpu_check}
WORK=${GPU_CHECK_WORK:-results/gpu_check/work}
ONLY=${ONLY:-tests,bench,train,sample}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$OUT_DIR" "$WORK"
rm -rf "$WORK"/run "$WORK"/random_run "$WORK"/steps.tsv
export PYTHONUNBUFFERED=1

# pytorch-fid from wheels in .whl/ when the machine lacks it and has no network (docs/gpu.md)
if ! $PY -c "import pytorch_fid" 2>/dev/null && ls .whl/pytorch_fid-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target "$WORK/site" .whl/pytorch_fid-*.whl \
    && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
HAVE_FID=$($PY -c "import pytorch_fid" 2>/dev/null && echo 1 || echo 0)
CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
$PY -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|',
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device: tiny configs, CUDA tests skip')" \
  | tee "$WORK/env.txt"

if [ "$CUDA" = 1 ]; then  # the paper's CIFAR10 UNet: mod_ch 64, ch_mul 1,2,4,4, 2 res blocks, cdim 128, 32x32
  BENCH="--modch 64 --chmul 1,2,4,4 --image_size 32 --batchsize 128 --steps 10 --warmup 3 --loop_steps 40
    --rows train_eager,train,loop"  # sampling speed is the sample step's
  MODEL="--modch 64 --chmul 1,2,4,4 --numres 2 --image_size 32"
  # a smaller UNet than the paper's for the run that stops and resumes: compiling the paper's took 119 s on an H200
  TRAIN="--modch 64 --chmul 1,2,2 --numres 1 --image_size 32 --batchsize 128 --epoch 20"
  STOP=150  # 14 steps per epoch: stop inside epoch 11, resume to step 280
  # the paper's UNet reached 0.022 at step 280 here on an H200 (docs/gpu.md); an untrained one is near 1
  LOSS_MAX=0.1
  GENUM=${GENUM:-5000}; GENBATCH=1000; STEPS=50; FEATURES="--inception_weights $WORK/random_inception.pth"
else
  BENCH="--modch 32 --chmul 1,2 --numres 1 --image_size 16 --batchsize 8 --steps 2 --warmup 1 --sample_timed_steps 2
    --loop_steps 8"
  MODEL="--modch 32 --chmul 1,2 --numres 1 --image_size 16"
  TRAIN="$MODEL --batchsize 64 --epoch 2"; STOP=20
  LOSS_MAX=0.5  # 56 steps of a tiny UNet (CPU): it starts near 1
  GENUM=100; GENBATCH=50; STEPS=5  # Inception on 2 CPU cores takes minutes: proto-FID checks the same plumbing
  FEATURES="--fid_features classifier --eval_classifier $WORK/random_classifier.pt"
fi
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node=1"

step() {  # step NAME SECONDS CMD...: run under a time limit, log to OUT_DIR/NAME.log, record rc and wall time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$WORK/steps.tsv"
  echo "   rc $rc, $((SECONDS - t0)) s"
}

case ",$ONLY," in *,tests,*)
  step tests 100 $PY -m pytest -q -rs -s tests/test_cuda.py tests/test_train_step.py -k "cuda or sync" ;;
esac
case ",$ONLY," in *,bench,*)
  step bench 190 $PY bench.py $BENCH --profile "$OUT_DIR/profile" --json ;;
esac
case ",$ONLY," in *,train,*)
  step train 70 $TORCHRUN train.py --dataset digits $TRAIN --max_steps $STOP --run_dir "$WORK/run" ${TRAIN_EXTRA:-} \
    --ddim True --num_steps 20 --genbatch 40 --sample_every 5 --interval 5 --log_every 10
  step resume 50 $TORCHRUN train.py --path_resume "$WORK/run" ;;
esac
case ",$ONLY," in *,sample,*)
  if [ "$HAVE_FID" = 1 ]; then
    step sample 70 bash -c "$PY scripts/gpu_check_report.py random-run $WORK $MODEL && $TORCHRUN sample.py \
      --path $WORK/random_run --epoch 0 --ddim True --num_steps $STEPS --genum $GENUM --genbatch $GENBATCH \
      --fid True $FEATURES --data_root $WORK/data"
  else
    echo "skip: sample (pytorch-fid is not installed; put its wheel in .whl/ or pip install pytorch-fid)" \
      | tee "$OUT_DIR/sample.log"
  fi ;;
esac
$PY scripts/gpu_check_report.py report "$OUT_DIR" "$WORK" "$GENUM" "$LOSS_MAX"
