"""A study's report: per arm the mean curve with a 95% band over training seeds; per evaluated epoch each arm's
difference to each baseline arm, paired by training seed, with a 95% t interval and a paired bootstrap interval and
the number of seeds it is ahead on; the declared endpoints (epochs to an FID threshold, interpolated on log-epochs,
as a ratio to the baseline; the mean FID over the early epochs); class 0 apart from the other classes. Markdown,
JSON and a plot, rebuilt from the runs' metrics.jsonl at any time (a part-way study gives a part-way report).

A training seed fixes the initial weights, the data order and the training noise in every arm, so the seed is the
unit of pairing and of resampling; an arm trained with several classifier seeds counts their mean per training seed.
"""
import json
import math
import os

import numpy as np
from scipy.special import stdtrit  # the Student t quantile (scipy.stats would cost a second to import)

from cli import write_atomic

LEVEL = 0.95
RESAMPLES = 10_000
# metric key -> (label, lower is better); the per-class figures are FID in narrow feature spaces, else KID
METRICS = {"fid": ("FID", True), "accuracy": ("class accuracy %", False),
           "fid_class0": ("class 0: FID/KID", True), "accuracy_class0": ("class 0: accuracy %", False),
           "fid_others": ("other classes: FID/KID (mean)", True),
           "accuracy_others": ("other classes: accuracy % (mean)", False)}


def t_interval(x: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Student-t interval of the mean of x (nan when fewer than two values)."""
    x = np.asarray(x, dtype=float)
    if len(x) < 2:
        return math.nan, math.nan
    half = stdtrit(len(x) - 1, (1 + level) / 2) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def bootstrap_interval(x: np.ndarray, level: float = LEVEL, resamples: int = RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of x over `resamples` resamples with replacement (Efron & Tibshirani 1993,
    ch. 13); of paired differences this is the paired bootstrap over seeds. nan when fewer than two values."""
    x = np.asarray(x, dtype=float)
    if len(x) < 2:
        return math.nan, math.nan
    means = x[np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summary(x: np.ndarray, lower_is_better: bool) -> dict:
    """n, mean, both intervals and the seeds ahead (below zero for a lower-is-better metric) of differences x."""
    x = np.asarray(x, dtype=float)
    ahead = int((x < 0).sum() if lower_is_better else (x > 0).sum())
    return {"n": len(x), "mean": float(x.mean()) if len(x) else math.nan, "t": t_interval(x),
            "bootstrap": bootstrap_interval(x), "ahead": ahead}


def epochs_to_reach(curve: dict[int, float], threshold: float) -> float | None:
    """The epoch at which an FID curve first reaches `threshold`, linear in log-epoch between the evaluation
    before and the first at or below it; None when it never does."""
    points = sorted(curve.items())
    for k, (epoch, value) in enumerate(points):
        if value <= threshold:
            if k == 0:
                return float(epoch)
            (e0, v0) = points[k - 1]
            frac = (v0 - threshold) / (v0 - value)
            return float(math.exp(math.log(e0) + frac * (math.log(epoch) - math.log(e0))))
    return None


def early_mean(curve: dict[int, float], until: int) -> float | None:
    """Area under an FID curve over log-epoch from its first evaluation to `until`, divided by that log-range: the
    curve's mean over the early epochs, each doubling of epochs weighted alike. None without two points there."""
    points = sorted((e, v) for e, v in curve.items() if e <= until)
    if len(points) < 2:
        return None
    x = np.log([e for e, _ in points])
    y = np.array([v for _, v in points])
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum() / (x[-1] - x[0]))


def record_values(record: dict) -> dict[str, float]:
    """The metrics of one fid record: FID, class accuracy and, with per-class figures, class 0 and the rest."""
    out = {"fid": record["value"]}
    if "class_accuracy" in record:
        out["accuracy"] = 100 * record["class_accuracy"]
    figures = record.get("per_class")
    if figures and figures.get("classes", [0])[0] == 0 and len(figures.get("classes", [])) > 1:
        for key, name in (("fid", "fid" if "fid" in figures else "kid"), ("accuracy", "class_accuracy")):
            values = [math.nan if v is None else v * (100 if key == "accuracy" else 1) for v in figures.get(name, [])]
            if values:
                out[f"{key}_class0"], out[f"{key}_others"] = values[0], float(np.nanmean(values[1:]))
    return out


def read_run(run_dir: str, evaluation: dict) -> dict[int, dict[str, float]]:
    """{epoch: metrics} of a run's fid records made by this evaluation (image count, w, sampling seed)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    curve = {}
    if not os.path.isfile(path):
        return curve
    for line in open(path):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a crash
            continue
        if r.get("event") == "fid" and r.get("n") == evaluation["images"] and \
                r.get("w") == evaluation.get("w", 1.8) and r.get("seed") == evaluation.get("seed", 0):
            curve[r["epoch"]] = record_values(r)
    return curve


def collect(runs: list, evaluation: dict) -> dict:
    """{metric: {arm: {training seed: {epoch: value}}}}, the mean over classifier seeds present at an epoch."""
    by_seed = {}
    for task in runs:
        for epoch, values in read_run(task.run_dir, evaluation).items():
            for metric, v in values.items():
                by_seed.setdefault(metric, {}).setdefault(task.arm, {}).setdefault(task.seed, {}) \
                    .setdefault(epoch, []).append(v)
    return {m: {a: {s: {e: float(np.mean(v)) for e, v in c.items()} for s, c in seeds.items()}
                for a, seeds in arms.items()} for m, arms in by_seed.items()}


def paired(data: dict, arm: str, base: str, epoch: int) -> np.ndarray:
    """arm minus base at `epoch`, one value per training seed both have."""
    a, b = data.get(arm, {}), data.get(base, {})
    return np.array([a[s][epoch] - b[s][epoch] for s in sorted(a) if s in b and epoch in a[s] and epoch in b[s]])


def fmt(s: dict, digits: int) -> str:
    """'mean [t lo, hi] [boot lo, hi] k/n' of a summary."""
    if s["n"] == 0:
        return "-"
    if s["n"] < 2:
        return f"{s['mean']:+.{digits}f} (n 1)"
    (tl, th), (bl, bh) = s["t"], s["bootstrap"]
    return (f"{s['mean']:+.{digits}f} [{tl:+.{digits}f}, {th:+.{digits}f}] [{bl:+.{digits}f}, {bh:+.{digits}f}] "
            f"{s['ahead']}/{s['n']}")


def analyse(study: dict, data: dict) -> dict:
    """Every number of the report: curves, paired differences and endpoints."""
    arms = list(study["arms"])
    bases = [b for b in study["endpoints"].get("baselines", []) if b in arms]
    out = {"arms": arms, "baselines": bases, "curves": {}, "paired": {}, "endpoints": {}}
    for metric, per_arm in data.items():
        lower = METRICS[metric][1]
        epochs = sorted({e for seeds in per_arm.values() for c in seeds.values() for e in c})
        out["curves"][metric] = {a: {e: {"n": len(v), "mean": float(np.mean(v)), "t": t_interval(v)}
                                     for e in epochs if len(v := [c[e] for c in per_arm.get(a, {}).values()
                                                                  if e in c])} for a in arms}
        out["paired"][metric] = {b: {a: {e: summary(d, lower) for e in epochs if len(d := paired(per_arm, a, b, e))}
                                     for a in arms if a != b} for b in bases}
    fid = data.get("fid", {})
    threshold, until = study["endpoints"].get("fid_threshold"), study["endpoints"].get("early_until")
    reach = {a: {s: epochs_to_reach(c, threshold) for s, c in fid.get(a, {}).items()} for a in arms} \
        if threshold is not None else {}
    early = {a: {s: early_mean(c, until) for s, c in fid.get(a, {}).items()} for a in arms} if until else {}
    ends = out["endpoints"]
    if reach:
        ends["epochs_to_threshold"] = {"threshold": threshold, "per_seed": reach, "ratio": {
            b: {a: summary_log_ratio(reach[a], reach[b]) for a in arms if a != b} for b in bases}}
    if early:
        ends["early_mean_fid"] = {"until": until, "per_seed": early, "paired": {
            b: {a: summary(np.array([early[a][s] - early[b][s] for s in sorted(early[a]) if s in early[b]
                                     and early[a][s] is not None and early[b][s] is not None]), True)
                for a in arms if a != b} for b in bases}}
    return out


def summary_log_ratio(arm: dict, base: dict) -> dict:
    """Per seed arm / base epochs-to-threshold (seeds where both reach it), summarised on log scale: the geometric
    mean ratio and both intervals, exponentiated; below 1 means fewer epochs."""
    logs = np.array([math.log(arm[s] / base[s]) for s in sorted(arm) if s in base and arm[s] and base[s]])
    s = summary(logs, True)
    s["mean"] = math.exp(s["mean"]) if len(logs) else math.nan
    s["t"] = tuple(math.exp(v) for v in s["t"])
    s["bootstrap"] = tuple(math.exp(v) for v in s["bootstrap"])
    s["never"] = {"arm": sum(v is None for v in arm.values()), "baseline": sum(v is None for v in base.values())}
    return s


def label(metric: str, study: dict) -> str:
    """A metric's name in the report: FID in Inception's feature space, proto-FID in a classifier's."""
    name = "FID" if study["evaluation"].get("features", "inception") == "inception" else "proto-FID"
    return METRICS[metric][0].replace("FID", name)


def markdown(study: dict, result: dict) -> str:
    """The report's tables."""
    arms, bases, ev, ends = result["arms"], result["baselines"], study["evaluation"], study["endpoints"]
    fid = label("fid", study)
    lines = [f"# Study {study['path']}: {study['dataset']}", "",
             f"Arms: {', '.join(f'`{a}` ({f})' for a, f in study['arms'].items())}.",
             f"Training seeds {study['train_seeds']}, classifier seeds {study.get('classifier_seeds', [0])} "
             f"(evaluation classifier seed {study['eval_classifier']['seed']}); {ev['images']} images per "
             f"evaluation ({ev.get('features', 'inception')} features, w {ev.get('w', 1.8)}, sampling seed "
             f"{ev.get('seed', 0)}, `{ev.get('sampler', '')}`). Declared endpoints: epochs to {fid} <= "
             f"{ends.get('fid_threshold')} (log-epoch interpolation; ratio to each baseline), mean {fid} over "
             f"log-epochs up to epoch {ends.get('early_until')}.",
             "Cells: mean [95% t interval] [95% paired bootstrap interval] seeds ahead/n; curves: mean [95% t band] "
             "(n). Differences are arm minus baseline, paired by training seed.", ""]
    for metric, per_arm in result["curves"].items():
        digits = 1 if "accuracy" in metric else 3
        epochs = sorted({e for c in per_arm.values() for e in c})
        lines += [f"## {label(metric, study)}: mean over seeds", "", "| epoch | " + " | ".join(arms) + " |",
                  "|---" * (len(arms) + 1) + "|"]
        for e in epochs:
            cells = [f"{c[e]['mean']:.{digits}f} [{c[e]['t'][0]:.{digits}f}, {c[e]['t'][1]:.{digits}f}] ({c[e]['n']})"
                     if e in (c := per_arm[a]) else "-" for a in arms]
            lines.append(f"| {e} | " + " | ".join(cells) + " |")
        for base, per in result["paired"][metric].items():
            others = [a for a in arms if a != base]
            lines += ["", f"### {label(metric, study)}: arm minus `{base}`", "",
                      "| epoch | " + " | ".join(others) + " |", "|---" * (len(others) + 1) + "|"]
            for e in epochs:
                lines.append(f"| {e} | " + " | ".join(fmt(per[a][e], digits) if e in per[a] else "-"
                                                      for a in others) + " |")
        lines.append("")
    reach = result["endpoints"].get("epochs_to_threshold")
    if reach:
        lines += [f"## Endpoint 1: epochs to {fid} <= {reach['threshold']}", "", "| arm | per seed | ratio to " +
                  " | ratio to ".join(f"`{b}`" for b in bases) + " |", "|---" * (len(bases) + 2) + "|"]
        for a in arms:
            per_seed = ", ".join("never" if v is None else f"{v:.1f}" for _, v in sorted(reach["per_seed"][a].items()))
            ratios = [ratio_cell(reach["ratio"][b][a]) if a != b else "1" for b in bases]
            lines.append(f"| {a} | {per_seed or '-'} | " + " | ".join(ratios) + " |")
        lines.append("")
    early = result["endpoints"].get("early_mean_fid")
    if early:
        lines += [f"## Endpoint 2: mean {fid} over log-epochs up to epoch {early['until']}", "",
                  "| arm | per seed | minus " + " | minus ".join(f"`{b}`" for b in bases) + " |",
                  "|---" * (len(bases) + 2) + "|"]
        for a in arms:
            per_seed = ", ".join("-" if v is None else f"{v:.3f}" for _, v in sorted(early["per_seed"][a].items()))
            lines.append(f"| {a} | {per_seed or '-'} | " + " | ".join(
                fmt(early["paired"][b][a], 3) if a != b else "0" for b in bases) + " |")
    return "\n".join(lines) + "\n"


def ratio_cell(s: dict) -> str:
    never = f"; never: arm {s['never']['arm']}, baseline {s['never']['baseline']}" if any(s["never"].values()) else ""
    if s["n"] < 2:
        return (f"{s['mean']:.2f} (n {s['n']})" if s["n"] else "-") + never
    return (f"{s['mean']:.2f} [{s['t'][0]:.2f}, {s['t'][1]:.2f}] [{s['bootstrap'][0]:.2f}, {s['bootstrap'][1]:.2f}] "
            f"{s['ahead']}/{s['n']}{never}")


def plot(study: dict, result: dict, path: str) -> None:
    """FID, class accuracy and class 0's accuracy per arm (mean, 95% t band) above, their paired differences to each
    baseline below."""
    import matplotlib  # here: a dry run or a submission of study.py needs no plotting
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    metrics = [m for m in ("fid", "accuracy", "accuracy_class0") if m in result["curves"]]
    epochs = sorted({e for c in result["curves"]["fid"].values() for e in c})
    bases = result["baselines"]
    fig, axes = plt.subplots(1 + len(bases), len(metrics), figsize=(5.5 * len(metrics), 3.8 * (1 + len(bases))),
                             squeeze=False)
    color = {a: f"C{i}" for i, a in enumerate(result["arms"])}
    for col, m in enumerate(metrics):
        for a, c in result["curves"][m].items():
            xs = sorted(c)
            if xs:
                axes[0][col].plot(xs, [c[e]["mean"] for e in xs], marker="o", color=color[a], label=a)
                axes[0][col].fill_between(xs, [c[e]["t"][0] for e in xs], [c[e]["t"][1] for e in xs],
                                          color=color[a], alpha=0.15)
        axes[0][col].set_ylabel(f"{label(m, study)} (mean, 95% band)")
        for row, b in enumerate(bases, start=1):
            for a, per in result["paired"][m][b].items():
                xs = sorted(per)
                if xs:
                    axes[row][col].plot(xs, [per[e]["mean"] for e in xs], marker="o", color=color[a], label=a)
                    axes[row][col].fill_between(xs, [per[e]["t"][0] for e in xs], [per[e]["t"][1] for e in xs],
                                                color=color[a], alpha=0.15)
            axes[row][col].axhline(0, color="k", lw=0.5)
            axes[row][col].set_ylabel(f"{label(m, study)}\nminus {b} (paired, 95% t)", fontsize=9)
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_xticks(epochs, [str(e) for e in epochs], fontsize=8)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{study['path']}: {study['dataset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(study: dict, runs: list) -> str:
    """Write OUT/report.md, report.json and report.png from the runs' metrics; returns a line naming them."""
    data = collect(runs, study["evaluation"])
    result = analyse(study, data)
    text = markdown(study, result)
    out = study["out"]
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "report.md"), lambda f: f.write(text.encode()))
    write_atomic(os.path.join(out, "report.json"), lambda f: f.write(json.dumps(result, indent=1).encode()))
    if result["curves"]:
        plot(study, result, os.path.join(out, "report.png"))
    scored = sum(bool(read_run(t.run_dir, study["evaluation"])) for t in runs)
    return (f"report of {scored}/{len(runs)} runs with scores -> {out}/report.md, report.json" +
            (", report.png" if result["curves"] else ""))
