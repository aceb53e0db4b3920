"""Helpers of scripts/gpu_check.sh and gpu_tune.sh: a random-weight run dir to sample, the report of the whole
check, and the table of the tuning sweep.

    python scripts/gpu_check_report.py random-run WORK --modch 64 --chmul 1,2,4,4 --numres 2 --image_size 32
    python scripts/gpu_check_report.py report OUT_DIR WORK GENUM
    python scripts/gpu_check_report.py tune OUT_DIR
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoints import build_models  # noqa: E402
from runtime import int_list  # noqa: E402


def random_run(work: str, flags: list[str]) -> None:
    """WORK/random_run: a run dir holding a random-weight UNet (3 channels, 10 classes) as its epoch 0, plus
    WORK/random_inception.pth, random weights in pytorch-fid's layout, so FID runs offline, and a random
    prototype classifier. Sampling costs the same whatever the weights; reference statistics come from digits."""
    from pytorch_fid import inception as pf_inception
    p = argparse.ArgumentParser()
    for flag in ("--modch", "--numres", "--image_size"):
        p.add_argument(flag, type=int, required=True)
    p.add_argument("--chmul", type=int_list, required=True)
    args = p.parse_args(flags)
    cfg = dict(vars(args), inch=3, outch=3, cdim=128, useconv=True, droprate=0.1, T=1000, schedule="linear", v=1.0,
               w=1.8, dataset="digits", data_root=os.path.join(work, "data"), tiny_imagenet_path=None,
               num_classes=10, classes=[str(i) for i in range(10)], clsnum=10)
    torch.manual_seed(0)
    net, cemb = build_models(cfg)
    run = os.path.join(work, "random_run")
    os.makedirs(os.path.join(run, "checkpoints"), exist_ok=True)
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    weights = {"net": net.state_dict(), "cemblayer": cemb.state_dict()}
    torch.save(dict(weights, ema=weights, epoch=0), os.path.join(run, "checkpoints", "ckpt_0_checkpoint.pt"))
    with mock.patch.object(pf_inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, sd, *a, **k: None):
        inception = pf_inception.fid_inception_v3()
    torch.save(inception.state_dict(), os.path.join(work, "random_inception.pth"))
    from prototypes import FORMAT, PrototypeClassifier  # proto-FID features for the CPU plumbing check
    clf = PrototypeClassifier(10, cfg["cdim"])
    torch.save({"format": FORMAT, "prototypes": clf.prototypes, "classifier": clf.state_dict(),
                "config": {"cdim": cfg["cdim"], "scale": 2.0}, "classes": cfg["classes"]}, os.path.join(work, "random_classifier.pt"))


def commit() -> str | None:
    """The commit under test: $GIT_COMMIT (a copied tree has no .git), else git's HEAD, else None."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


def read(path: str) -> str:
    return open(path).read() if os.path.isfile(path) else ""


def check_train(work: str, loss_max: float) -> dict:
    """The stopped and resumed run: it went on past the stop, finished, its loss stayed finite and ended below
    loss_max."""
    run = os.path.join(work, "run")
    records = [json.loads(line) for line in read(os.path.join(run, "metrics.jsonl")).splitlines()]
    steps = [r for r in records if r.get("event") == "train"]
    log = read(os.path.join(run, "log.txt"))
    cfg = json.loads(read(os.path.join(run, "config.json")) or "{}")
    out = {"logged_steps": [r["step"] for r in steps], "losses": [round(r["loss"], 4) for r in steps],
           "img_per_s_last": steps[-1]["img_per_s"] if steps else None,
           "compile_lines": re.findall(r"torch\.compile[^\n]*", log)}
    stop = re.search(r"stopped by --max_steps \d+ at step (\d+)", log)
    final = os.path.join(run, "checkpoints", f"ckpt_{cfg.get('epoch')}_checkpoint.pt")
    out["checks"] = {
        "stopped with a checkpoint": bool(stop),
        "resumed": "resumed " in log,
        "went on past the stop": bool(stop and steps and steps[-1]["step"] > int(stop.group(1))),
        "final epoch checkpoint written": os.path.isfile(final),
        "losses finite": bool(steps) and all(math.isfinite(r["loss"]) for r in steps),
        f"last loss below {loss_max}": bool(steps) and steps[-1]["loss"] < loss_max,
    }
    return out


def report(out_dir: str, work: str, genum: int, loss_max: float) -> int:
    steps = {}
    for line in read(os.path.join(work, "steps.tsv")).splitlines():
        name, rc, seconds = line.split("\t")
        steps[name] = {"rc": int(rc), "seconds": int(seconds)}
    rep = {"environment": read(os.path.join(work, "env.txt")).strip(), "date": time.strftime("%Y-%m-%d"),
           "commit": commit(), "steps": steps}
    tests_log = read(os.path.join(out_dir, "tests.log")) if "tests" in steps else ""
    rep["tests"] = {"summary": (re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped).*?)(?: in [\d.]+s)?\s*=*$",
                                           tests_log, re.M) or [""])[-1],
                    "per_image_seeds": (re.findall(r"per-image seeds on CUDA.*", tests_log) or [None])[-1]}
    bench_lines = [line for line in read(os.path.join(out_dir, "bench.log")).splitlines()
                   if line.startswith("{") and "bench" in steps]
    rep["bench"] = json.loads(bench_lines[-1]) if bench_lines else None
    if "train" in steps:
        rep["train"] = check_train(work, loss_max)
    fid = re.search(r"^((?:proto-)?FID ([^\s,]+).*?\((\d+) images.*)$", read(os.path.join(out_dir, "sample.log")), re.M)
    if "sample" in steps:
        wall = steps["sample"]["seconds"]
        rep["sample"] = {"images": genum, "wall_s": wall, "fid_line": fid.group(1) if fid else None,
                         "fid": float(fid.group(2)) if fid else None, "counted": int(fid.group(3)) if fid else None,
                         "extrapolated_50k_s": round(wall * 50000 / genum)}
    failures = [f"step {n} exited {s['rc']}" for n, s in steps.items() if s["rc"] != 0]
    failures += [f"train: {c}" for c, ok in rep.get("train", {}).get("checks", {}).items() if not ok]
    if "sample" in steps and not (fid and math.isfinite(rep["sample"]["fid"]) and rep["sample"]["counted"] == genum):
        failures.append(f"sample: no finite FID over {genum} images")
    rep["failures"] = failures
    rep["passed"] = not failures
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(rep, f, indent=1)

    lines = [rep["environment"], ""]
    lines += [f"{n:<8} rc {s['rc']:>3}  {s['seconds']:>4} s" for n, s in steps.items()]
    if tests_log:
        lines += ["", f"tests: {rep['tests']['summary']}", f"  {rep['tests']['per_image_seeds'] or ''}"]
    if rep["bench"]:
        b = rep["bench"]
        lines += ["", f"bench on {b['device']} (train batch {b['config']['batchsize']}):"]
        for label, r in b["rows"].items():
            tflops = (f", {b['train_flops_per_step'] / r['s_per_step'] / 1e12:.1f} TFLOP/s"
                      + (f" ({100 * b['train_flops_per_step'] / r['s_per_step'] / 1e12 / b['bf16_matmul_tflops']:.1f}%"
                         " of the measured bf16 matmul)" if b.get("bf16_matmul_tflops") else "")
                      if b["train_flops_per_step"] and label.startswith("train") else "")
            mem = f", peak {r['peak_mem_gb']:.2f} GiB" if r.get("peak_mem_gb") is not None else ""
            lines.append(f"  {label}: {r['img_per_s']:.1f} img/s{mem}{tflops}")
        step_row = next((r for k, r in b["rows"].items() if k.startswith("train step, optimised")), None)
        loop_row = next((r for k, r in b["rows"].items() if k.startswith("train.py loop")), None)
        if step_row:
            lines.append(f"  setup and compilation {step_row['compile_s']:.1f} s; train speed-up "
                         f"{b['train_speedup']:.2f}x")
        if step_row and loop_row:
            lines.append(f"  train.py's own loop / bench's step: {loop_row['img_per_s'] / step_row['img_per_s']:.2f}")
        if b.get("bf16_matmul_tflops"):
            lines.append(f"  bf16 matmul 8192^3 measured {b['bf16_matmul_tflops']:.0f} TFLOP/s, datasheet "
                         f"{b['bf16_peak_tflops'] or 'unknown'}")
        prof = (step_row or {}).get("profile")
        if prof:
            lines.append(f"  profile ({prof['dir']}): {prof['ms_per_step']:.1f} ms per step, {prof['busy_what']} "
                         f"{100 * prof['busy_share']:.1f}% of the wall time; top ops (ms per step):")
            lines += [f"    {ms:8.2f}  {name}" for name, ms in prof["top_ops"][:10]]
    if "train" in rep:
        t = rep["train"]
        lines += ["", f"train + resume: steps {t['logged_steps'][:1]}..{t['logged_steps'][-1:]}, loss "
                      f"{t['losses'][:1]} -> {t['losses'][-1:]}, last {t['img_per_s_last'] or 0:.0f} img/s"]
        lines += [f"  {c}" for c in t["compile_lines"]]
        lines += [f"  {'ok  ' if ok else 'FAIL'} {c}" for c, ok in t["checks"].items()]
    if "sample" in rep:
        s = rep["sample"]
        lines += ["", f"sample.py --fid: {s['images']} images in {s['wall_s']} s (whole command); 50,000 "
                      f"extrapolated linearly: {s['extrapolated_50k_s']} s", f"  {s['fid_line']}"]
    lines += ["", "PASSED" if rep["passed"] else "FAILED: " + "; ".join(failures)]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write(text + "\n")
    return 0 if rep["passed"] else 1


def tune(out_dir: str) -> int:
    """One table of gpu_tune.sh's rows (from rows.tsv and each row's bench.py JSON) and tune.json with the best."""
    rows, bench = [], None
    for line in read(os.path.join(out_dir, "rows.tsv")).splitlines():
        i, batch, mode, cl, status = line.split("\t")
        row = {"batch": int(batch), "compile_mode": mode, "channels_last": cl == "True", "status": status}
        lines = [x for x in read(os.path.join(out_dir, f"row_{i}.json")).splitlines() if x.startswith("{")]
        if lines:
            bench = json.loads(lines[-1])
            # a training row, or the sampling row that runs the compiled network (CFG as one 2B forward)
            label, r = next((k, v) for k, v in bench["rows"].items() if k.startswith("train step") or "one 2B" in k)
            row.update(img_per_s=r["img_per_s"], compile_s=r["compile_s"], peak_mem_gb=r["peak_mem_gb"])
            flops = bench["train_flops_per_step"] if label.startswith("train") else None
            if flops:
                row["tflops"] = flops / r["s_per_step"] / 1e12
                row["pct_matmul"] = 100 * row["tflops"] / bench["bf16_matmul_tflops"]
                if bench["bf16_peak_tflops"]:
                    row["pct_datasheet"] = 100 * row["tflops"] / bench["bf16_peak_tflops"]
        rows.append(row)
    measured = [r for r in rows if "img_per_s" in r]
    best = max(measured, key=lambda r: r["img_per_s"], default=None)
    head = bench or {}
    rep = {"device": head.get("device"), "torch": head.get("torch"), "date": head.get("date"), "commit": commit(),
           "bf16_matmul_tflops": head.get("bf16_matmul_tflops"), "bf16_peak_tflops": head.get("bf16_peak_tflops"),
           "rows": rows, "best": best}
    with open(os.path.join(out_dir, "tune.json"), "w") as f:
        json.dump(rep, f, indent=1)

    def cell(r: dict, key: str, fmt: str) -> str:
        return format(r[key], fmt) if r.get(key) is not None else "-"

    lines = [f"{rep['device']}, torch {rep['torch']}, {rep['date']}; bf16 matmul measured "
             f"{cell(rep, 'bf16_matmul_tflops', '.0f')} TFLOP/s, datasheet {cell(rep, 'bf16_peak_tflops', '.0f')}",
             f"{'batch':>5} {'compile mode':<28} {'ch_last':<7} {'img/s':>9} {'TFLOP/s':>8} {'%matmul':>7} "
             f"{'%sheet':>6} {'compile s':>9} {'mem GiB':>7}  status"]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['compile_mode']:<28} {str(r['channels_last']):<7} "
                     f"{cell(r, 'img_per_s', '9.1f'):>9} {cell(r, 'tflops', '8.1f'):>8} "
                     f"{cell(r, 'pct_matmul', '7.1f'):>7} {cell(r, 'pct_datasheet', '6.1f'):>6} "
                     f"{cell(r, 'compile_s', '9.1f'):>9} {cell(r, 'peak_mem_gb', '7.2f'):>7}  {r['status']}")
    if best:
        lines.append(f"fastest: batch {best['batch']}, {best['compile_mode']}, channels_last {best['channels_last']}: "
                     f"{best['img_per_s']:.1f} img/s")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write(text + "\n")
    return 0 if best else 1


if __name__ == "__main__":
    if sys.argv[1] == "random-run":
        random_run(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "tune":
        sys.exit(tune(sys.argv[2]))
    else:
        sys.exit(report(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])))
