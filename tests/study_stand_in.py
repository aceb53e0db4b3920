"""Stands in for train.py, sample.py and train_classifier.py under study.py (LAUNCH="python tests/study_stand_in.py")
in tests of the study's own orchestration: the real programs' start-or-continue is tested in test_reliability.py and
test_sample.py, and each costs seconds of imports per process.

train.py: 40 steps of 50 ms; SIGTERM stops at a step boundary with a checkpoint (RUN/step) and exit 0, as train.py
does; a rerun resumes from RUN/step ("resumed at step N"). sample.py: an fid record per epoch 1 and 2 in
RUN/metrics.jsonl (value 10 / epoch), skipped when there. train_classifier.py: writes --out.
"""
import json
import os
import signal
import sys
import time

from cli import file_digest

program, args = sys.argv[1], sys.argv[2:]
flag = {k: v for k, v in zip(args, args[1:]) if k.startswith("--")}
if program == "train_classifier.py":
    open(flag["--out"], "w").close()
elif program == "train.py":
    run = flag["--run_dir"]
    os.makedirs(run, exist_ok=True)
    done = int(open(os.path.join(run, "step")).read()) if os.path.exists(os.path.join(run, "step")) else 0
    print(f"resumed at step {done}" if done else "started", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    for step in range(done, 40):
        if stop:
            print(f"stopped by SIGTERM at step {step}", flush=True)
            break
        print(f"step {step + 1}", flush=True)
        time.sleep(0.05)
        done = step + 1
    with open(os.path.join(run, "step"), "w") as f:
        f.write(str(done))
elif program == "sample.py":
    metrics = os.path.join(flag["--path"], "metrics.jsonl")
    if not os.path.exists(metrics):
        with open(metrics, "w") as f:
            for epoch in (1, 2):
                f.write(json.dumps({"event": "fid", "epoch": epoch, "value": 10 / epoch, "n": int(flag["--genum"]),
                                    "w": float(flag["--w"]), "seed": int(flag["--seed"]), "sampler": "ddim",
                                    "steps": int(flag["--num_steps"]), "eta": 0.0, "select": "linear",
                                    "weights": "ema", "label": "range",
                                    "features": f"classifier {os.path.abspath(flag['--eval_classifier'])}",
                                    "classifier_sha1": file_digest(flag["--eval_classifier"])[:12]}) + "\n")
