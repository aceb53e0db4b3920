"""Helpers of scripts/gpu_check.sh and gpu_tune.sh: the preflight, random scorers for an offline FID, the report of
the check (rewritten after every step, so it imports no torch: a second, not several), and the table of the
tuning sweep.

    python scripts/gpu_check_report.py preflight WORK
    python scripts/gpu_check_report.py random-scorers WORK
    python scripts/gpu_check_report.py report OUT_DIR WORK CALL GENUM LOSS_MAX COMPILE_S partial|final
    python scripts/gpu_check_report.py tune OUT_DIR WORK
"""
import json
import math
import os
import re
import subprocess
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


ENTRY_POINTS = ("train", "sample", "bench", "sampling", "evaluate", "fid", "train_classifier", "structure",
                "plot_fid", "study")


def preflight(work: str) -> int:
    """What the check needs, in one table (WORK/env.txt): torch >= 2.7, every entry point importable, a working
    C++ compiler (inductor on CPU), triton and free memory on CUDA; pytorch-fid is optional. Non-zero if one fails."""
    import importlib
    import shutil
    import torch
    lines, failures = [], []
    version = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
    lines.append(f"torch {torch.__version__} (cuda {torch.version.cuda})")
    if version < (2, 7):
        failures.append(f"torch {torch.__version__} is older than 2.7")
    for name in ENTRY_POINTS:
        try:
            importlib.import_module(name)
        except Exception as e:  # report every import that fails, not only the first
            failures.append(f"import {name}: {type(e).__name__}: {e}")
    lines.append(f"entry points importable: {', '.join(ENTRY_POINTS)}" if not any(
        f.startswith("import") for f in failures) else "entry points: see failures")
    try:
        import pytorch_fid  # noqa: F401
        lines.append("pytorch-fid: present (Inception FID)")
    except ImportError:
        lines.append("pytorch-fid: absent (the sample step scores proto-FID instead)")
    cxx = shutil.which("g++") or shutil.which("c++")
    lines.append(f"C++ compiler: {cxx or 'none'}")
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        lines.append(f"{torch.cuda.get_device_name()}: {free / 2 ** 30:.1f} of {total / 2 ** 30:.1f} GiB free, "
                     f"{torch.cuda.device_count()} device(s)")
        if free < 20 * 2 ** 30:
            failures.append(f"only {free / 2 ** 30:.1f} GiB free on the GPU (the check needs about 20)")
        try:
            import triton
            lines.append(f"triton {triton.__version__}")
        except ImportError:
            failures.append("triton is missing: torch.compile cannot build CUDA kernels")
    else:
        lines.append("no CUDA device: tiny configs, CUDA tests skip")
        if cxx is None:
            failures.append("no C++ compiler: torch.compile cannot build CPU kernels")
    lines += [f"FAIL {f}" for f in failures]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(work, "env.txt"), "w") as f:
        f.write(text + "\n")
    return 1 if failures else 0


def bench_json(log: str) -> dict | None:
    """The JSON line bench.py --json printed into a step's log, if any."""
    lines = [line for line in read(log).splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def random_scorers(work: str) -> None:
    """WORK/random_classifier.pt (a random prototype classifier: proto-FID features) and, where pytorch-fid is
    installed, WORK/random_inception.pth (random weights in its layout), so that the sample step scores offline.
    Scoring costs the same whatever the weights."""
    import torch
    from prototypes import FORMAT, PrototypeClassifier
    torch.manual_seed(0)
    clf = PrototypeClassifier(10, 128)
    torch.save({"format": FORMAT, "prototypes": clf.prototypes, "classifier": clf.state_dict(),
                "config": {"cdim": 128, "scale": 2.0}, "classes": [str(i) for i in range(10)]},
               os.path.join(work, "random_classifier.pt"))
    try:
        from pytorch_fid import inception as pf_inception
    except ImportError:
        return
    with mock.patch.object(pf_inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, sd, *a, **k: None):
        inception = pf_inception.fid_inception_v3()
    torch.save(inception.state_dict(), os.path.join(work, "random_inception.pth"))


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
    """The stopped and resumed run: it went on past the stop, finished, its loss stayed finite, fell, and ended below
    loss_max (an untrained UNet's is near 1)."""
    run = os.path.join(work, "run")
    records = [json.loads(line) for line in read(os.path.join(run, "metrics.jsonl")).splitlines()]
    steps = [r for r in records if r.get("event") == "train"]
    log = read(os.path.join(run, "log.txt"))
    cfg = json.loads(read(os.path.join(run, "config.json")) or "{}")
    out = {"logged_steps": [r["step"] for r in steps], "losses": [round(r["loss"], 4) for r in steps],
           "img_per_s_last": steps[-1]["img_per_s"] if steps else None,
           "compile_lines": re.findall(r"torch\.compile[^\n]*", log),
           "compiles": [r for r in records if r.get("event") == "compile"]}
    losses = [r for r in out["compiles"] if r["network"] == "loss"]
    stop = re.search(r"stopped by --max_steps \d+ at step (\d+)", log)
    resumed = re.search(r"resumed .* at epoch \d+, step (\d+) of the epoch", log)
    final = os.path.join(run, "checkpoints", f"ckpt_{cfg.get('epoch')}_checkpoint.pt")
    out["checks"] = {
        "stopped with a checkpoint": bool(stop),
        "stopped and resumed inside an epoch": bool(resumed) and int(resumed.group(1)) > 0,
        "went on past the stop": bool(stop and steps and steps[-1]["step"] > int(stop.group(1))),
        "final epoch checkpoint written": os.path.isfile(final),
        "losses finite": bool(steps) and all(math.isfinite(r["loss"]) for r in steps),
        f"last loss below {loss_max} and below the first": bool(steps) and steps[-1]["loss"] < min(
            loss_max, steps[0]["loss"]),
        "the loss compiled at the start and at the resume": len(losses) == 2 and all(r["compiled"] for r in losses),
        "no compile fell back to eager": all(r["compiled"] for r in out["compiles"]),
    }
    return out


def log_tails(work: str, steps: dict, lines: int = 30) -> str:
    """The last lines of every step's log (progress bars reduced to their last state), for OUT_DIR/logs.txt."""
    parts = []
    for name, s in steps.items():
        text = read(os.path.join(work, "logs", f"{name}.log"))
        tail = [line.split("\r")[-1] for line in text.splitlines()][-lines:]
        parts.append(f"== {name}: rc {s['rc']}, {s['seconds']} s\n" + "\n".join(tail))
    return "\n\n".join(parts) + "\n"


def report(out_dir: str, work: str, call: int, genum: int, loss_max: float, compile_s: int, stage: str) -> int:
    """report.json, summary.txt and logs.txt of the call's steps so far (stage partial: after each step; final: the
    verdict), and call 1's metrics.jsonl: the only files written to OUT_DIR."""
    steps = {}
    for line in read(os.path.join(work, "steps.tsv")).splitlines():
        name, rc, seconds, limit = line.split("\t")
        steps[name] = {"rc": int(rc), "seconds": int(seconds), "limit": int(limit)}
    logs = os.path.join(work, "logs")
    rep = {"call": call, "environment": read(os.path.join(work, "env.txt")).strip(), "date": time.strftime("%Y-%m-%d"),
           "commit": commit(), "complete": stage == "final", "compile_s_assumed": compile_s, "steps": steps}
    tests_log = read(os.path.join(logs, "tests.log")) if "tests" in steps else ""
    rep["tests"] = {"summary": (re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped).*?)(?: in [\d.]+s)?\s*=*$",
                                           tests_log, re.M) or [""])[-1],
                    "per_image_seeds": (re.findall(r"per-image seeds on CUDA.*", tests_log) or [None])[-1]}
    rep["bench"] = bench_json(os.path.join(logs, "bench.log")) if "bench" in steps else None
    if "train" in steps:
        rep["train"] = check_train(work, loss_max)
    fid = re.search(r"^(?:epoch \d+: )?((?:proto-)?FID ([^\s,]+).*?\((\d+) images.*)$",
                    read(os.path.join(logs, "sample.log")), re.M)
    if "sample" in steps:
        wall = steps["sample"]["seconds"]
        records = [json.loads(line) for line in read(os.path.join(work, "run", "metrics.jsonl")).splitlines()]
        fids = [r for r in records if r.get("event") == "fid"]
        rep["sample"] = {"images": genum, "wall_s": wall, "img_per_s_whole_command": round(genum / max(wall, 1), 1),
                         "fid_line": fid.group(1) if fid else None, "fid": float(fid.group(2)) if fid else None,
                         "counted": int(fid.group(3)) if fid else None,
                         "compiles": fids[-1].get("compile", []) if fids else []}
    # every compile of the check, in order: each graph should be compiled cold once, later ones warm (seconds)
    rep["compiles"] = [dict(step="train/resume", **{k: c[k] for k in ("network", "compiled", "seconds")})
                       for c in rep.get("train", {}).get("compiles", [])]
    rep["compiles"] += [dict(step="sample", **{k: c[k] for k in ("network", "compiled", "seconds")})
                        for c in (rep.get("sample") or {}).get("compiles", [])]
    rep["compiles"] += [{"step": "bench", "network": label, "compiled": row["compiled"], "seconds": row["compile_s"]}
                        for label, row in (rep.get("bench") or {}).get("rows", {}).items() if row.get("compiled")]
    failures = [f"step {n} exited {s['rc']}" + (" (its time limit)" if s["rc"] in (124, 137) else "")
                for n, s in steps.items() if s["rc"] != 0]
    # a compile that fell back to eager fails the check: the compiled path is what users run on a GPU
    for name in ("bench",):
        b = rep[name] or {}
        asked = b.get("config", {}).get("compile") == "True" or not b.get("device", "CPU").startswith("CPU")
        for label, row in b.get("rows", {}).items():
            if asked and ("optimised" in label or label.startswith("train.py loop")) and not row["compiled"]:
                failures.append(f"{name}: '{label}' ran eager ({row.get('compile_error', 'compile off')})")
    for outcome in (rep.get("sample") or {}).get("compiles", []):
        if not outcome["compiled"]:
            failures.append(f"sample: the {outcome['network']} ran eager ({outcome['reason']})")
    failures += [f"train: {c}" for c, ok in rep.get("train", {}).get("checks", {}).items() if not ok]
    if "sample" in steps and not (fid and math.isfinite(rep["sample"]["fid"]) and rep["sample"]["counted"] == genum):
        failures.append(f"sample: no finite FID over {genum} images")
    rep["failures"] = failures
    rep["passed"] = not failures if stage == "final" else None
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(rep, f, indent=1)
    with open(os.path.join(out_dir, "logs.txt"), "w") as f:
        f.write(log_tails(work, steps))
    metrics = read(os.path.join(work, "run", "metrics.jsonl")) if call == 1 else ""
    if metrics:
        with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
            f.write(metrics)

    lines = [f"call {call}", rep["environment"], ""]
    lines += [f"{n:<9} rc {s['rc']:>3}  {s['seconds']:>4} s (limit {s['limit']} s)" for n, s in steps.items()]
    lines.append(f"{'total':<9}         {sum(s['seconds'] for s in steps.values()):>4} s")
    lines.append(f"limits set for a cold compile of C = {compile_s} s; compiles (cold once, then warm):")
    lines += [f"  {c['step']:<12} {c['network']}: {'compiled' if c['compiled'] else 'EAGER'} in {c['seconds']} s"
              for c in rep["compiles"]]
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
            speedup = f"; train speed-up {b['train_speedup']:.2f}x" if b.get("train_speedup") else ""
            lines.append(f"  setup and compilation {step_row['compile_s']:.1f} s{speedup}")
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
        lines += ["", f"sample.py --fid: {s['images']} images in {s['wall_s']} s (whole command, "
                      f"{s['img_per_s_whole_command']} img/s)", f"  {s['fid_line']}"]
    verdict = "PASSED" if rep["passed"] else "FAILED: " + "; ".join(failures)
    lines += ["", verdict if stage == "final" else "partial: " + ("; ".join(failures) or "no failure so far")]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write(text + "\n")
    return 0 if rep["passed"] or stage != "final" else 1


def tune(out_dir: str, work: str) -> int:
    """One table of gpu_tune.sh's rows (from WORK's rows.tsv and each row's bench.py JSON) and tune.json with the
    best."""
    rows, bench = [], None
    for line in read(os.path.join(work, "rows.tsv")).splitlines():
        i, batch, mode, cl, scope, status = line.split("\t")
        row = {"batch": int(batch), "compile_mode": mode, "channels_last": cl == "True", "compile_scope": scope,
               "status": status}
        lines = [x for x in read(os.path.join(work, f"row_{i}.json")).splitlines() if x.startswith("{")]
        if lines:
            bench = json.loads(lines[-1])
            # a training row, or the sampling row that runs the compiled network (CFG as one 2B forward)
            label, r = next((k, v) for k, v in bench["rows"].items() if k.startswith("train step") or "one 2B" in k)
            row.update(img_per_s=r["img_per_s"], compile_s=r["compile_s"], peak_mem_gb=r["peak_mem_gb"],
                       compile_failed=bench["config"]["compile"] == "True" and not r["compiled"])
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
             f"{'batch':>5} {'compile mode':<28} {'scope':<8} {'ch_last':<7} {'img/s':>9} {'TFLOP/s':>8} "
             f"{'%matmul':>7} {'%sheet':>6} {'compile s':>9} {'mem GiB':>7}  status"]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['compile_mode']:<28} {r['compile_scope']:<8} {str(r['channels_last']):<7} "
                     f"{cell(r, 'img_per_s', '9.1f'):>9} {cell(r, 'tflops', '8.1f'):>8} "
                     f"{cell(r, 'pct_matmul', '7.1f'):>7} {cell(r, 'pct_datasheet', '6.1f'):>6} "
                     f"{cell(r, 'compile_s', '9.1f'):>9} {cell(r, 'peak_mem_gb', '7.2f'):>7}  {r['status']}"
                     + (" (ran eager: the compile failed)" if r.get("compile_failed") else ""))
    if best:
        lines.append(f"fastest: batch {best['batch']}, {best['compile_mode']} ({best['compile_scope']}), "
                     f"channels_last {best['channels_last']}: "
                     f"{best['img_per_s']:.1f} img/s")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write(text + "\n")
    return 0 if best else 1


if __name__ == "__main__":
    if sys.argv[1] == "preflight":
        sys.exit(preflight(sys.argv[2]))
    elif sys.argv[1] == "random-scorers":
        random_scorers(sys.argv[2])
    elif sys.argv[1] == "tune":
        sys.exit(tune(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(report(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]),
                        int(sys.argv[7]), sys.argv[8]))
