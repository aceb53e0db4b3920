"""Helpers of scripts/gpu_check.sh: a random-weight run dir to sample, and the report of the whole check.

    python scripts/gpu_check_report.py random-run WORK --modch 64 --chmul 1,2,4,4 --numres 2 --image_size 32
    python scripts/gpu_check_report.py report OUT_DIR WORK GENUM
"""
import argparse
import json
import math
import os
import re
import sys
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


def read(path: str) -> str:
    return open(path).read() if os.path.isfile(path) else ""


def check_train(work: str) -> dict:
    """The stopped and resumed run: it went on past the stop, finished, and its loss stayed finite and fell."""
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
        "loss fell": len(steps) > 1 and steps[-1]["loss"] < steps[0]["loss"],
    }
    return out


def report(out_dir: str, work: str, genum: int) -> int:
    steps = {}
    for line in read(os.path.join(work, "steps.tsv")).splitlines():
        name, rc, seconds = line.split("\t")
        steps[name] = {"rc": int(rc), "seconds": int(seconds)}
    rep = {"environment": read(os.path.join(work, "env.txt")).strip(), "steps": steps}
    tests_log = read(os.path.join(out_dir, "tests.log")) if "tests" in steps else ""
    rep["tests"] = {"summary": (re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped).*?)(?: in [\d.]+s)?\s*=*$",
                                           tests_log, re.M) or [""])[-1],
                    "per_image_seeds": (re.findall(r"per-image seeds on CUDA.*", tests_log) or [None])[-1]}
    bench_lines = [line for line in read(os.path.join(out_dir, "bench.log")).splitlines()
                   if line.startswith("{") and "bench" in steps]
    rep["bench"] = json.loads(bench_lines[-1]) if bench_lines else None
    if "train" in steps:
        rep["train"] = check_train(work)
    fid = re.search(r"^((?:proto-)?FID [\d.]+.*)$", read(os.path.join(out_dir, "sample.log")), re.M)
    if "sample" in steps:
        wall = steps["sample"]["seconds"]
        rep["sample"] = {"images": genum, "wall_s": wall, "fid_line": fid.group(1) if fid else None,
                         "extrapolated_50k_s": round(wall * 50000 / genum)}
    failures = [f"step {n} exited {s['rc']}" for n, s in steps.items() if s["rc"] != 0]
    failures += [f"train: {c}" for c, ok in rep.get("train", {}).get("checks", {}).items() if not ok]
    if "sample" in steps and not fid:
        failures.append("sample: no FID line")
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
                      + (f" ({100 * b['train_flops_per_step'] / r['s_per_step'] / 1e12 / b['bf16_peak_tflops']:.1f}%"
                         " of bf16 peak)" if b["bf16_peak_tflops"] else "")
                      if b["train_flops_per_step"] and label.startswith("train") else "")
            mem = f", peak {r['peak_mem_gb']:.2f} GiB" if r.get("peak_mem_gb") is not None else ""
            lines.append(f"  {label}: {r['img_per_s']:.1f} img/s{mem}{tflops}")
        lines.append(f"  compilation {list(b['rows'].values())[1]['compile_s']:.1f} s; "
                     f"train speed-up {b['train_speedup']:.2f}x")
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


if __name__ == "__main__":
    if sys.argv[1] == "random-run":
        random_run(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(report(sys.argv[2], sys.argv[3], int(sys.argv[4])))
