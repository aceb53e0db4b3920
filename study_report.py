"""A study's report, rebuilt from the runs' metrics.jsonl at any time (a part-way study gives a part-way report):
first the declared tests (each endpoint for each declared comparison: the paired estimate with its 95% t interval,
the seeds ahead, the exact sign-flip p-value, Holm's correction across all of them and the equivalence test against
the declared margin), then, exploratory, each arm's curve with a 95% band over training seeds and each arm's paired
difference to each baseline at every scored point; class 0 apart from the other classes (per-class KID, unbiased at
the few images a class gets). Markdown, JSON and a plot. The statistics: study_stats.py.

A training seed fixes the initial weights, the data order and the training noise in every arm, so the seed is the
unit of pairing and of the permutation test; an arm trained with several classifier seeds counts their mean per
training seed. Which records are the study's: study_records.py.
"""
import json
import math
import os

import numpy as np

from cli import write_atomic
from study_records import METRICS, axis, collect
from study_stats import censored_log_ratio, early_mean, equivalence, holm, smallest_p, summary, t_interval, \
    time_to_reach

ENDPOINTS = {"steps_to_threshold": "steps to the threshold (ratio)", "early_mean": "early mean"}


def paired(data: dict, arm: str, base: str, epoch: int) -> np.ndarray:
    """arm minus base at `epoch`, one value per training seed both have."""
    a, b = data.get(arm, {}), data.get(base, {})
    return np.array([a[s][epoch] - b[s][epoch] for s in sorted(a) if s in b and epoch in a[s] and epoch in b[s]])


def comparisons(study: dict) -> list[tuple[str, str]]:
    """The declared (arm, baseline) pairs: endpoints.comparisons ("arm - baseline"), else every other arm against
    every baseline."""
    arms, bases = list(study["arms"]), [b for b in study["endpoints"].get("baselines", []) if b in study["arms"]]
    declared = study["endpoints"].get("comparisons")
    if declared is None:
        return [(a, b) for b in bases for a in arms if a not in bases or arms.index(a) > arms.index(b)]
    pairs = [tuple(x.strip() for x in c.split(" - ")) for c in declared]
    return [(a, b) for a, b in pairs if a in arms and b in arms]


def declared_tests(study: dict, fid: dict) -> tuple[dict, list[dict]]:
    """Each declared endpoint per run, and its tests for every declared comparison with Holm's adjustment."""
    ends, arms = study["endpoints"], list(study["arms"])
    threshold, until, margin = ends.get("fid_threshold"), ends.get("early_until"), ends.get("equivalence", {})
    per_run, tests = {}, []
    if threshold is not None:
        per_run["steps_to_threshold"] = {a: {s: time_to_reach(c, threshold) for s, c in fid.get(a, {}).items()}
                                         for a in arms}
    if until:
        per_run["early_mean"] = {a: {s: early_mean(c, until) for s, c in fid.get(a, {}).items()} for a in arms}
    for endpoint, runs in per_run.items():
        for a, b in comparisons(study):
            if endpoint == "steps_to_threshold":
                s = censored_log_ratio(runs[a], runs[b])
                m = margin.get("ratio")
                eq = equivalence(np.array(s["logs"]), -math.log(m), math.log(m)) if m else None
                if eq:
                    eq["interval"] = tuple(math.exp(v) for v in eq["interval"])
                    eq["margin"] = (1 / m, m)
            else:
                x = np.array([runs[a][k] - runs[b][k] for k in sorted(runs[a]) if k in runs[b]
                              and runs[a][k] is not None and runs[b][k] is not None])
                s, m = summary(x, True), margin.get("early_mean")
                eq = equivalence(x, -m, m) if m else None
            tests.append({"endpoint": endpoint, "arm": a, "baseline": b, **s, "equivalence": eq})
    declared = ends.get("declared", list(per_run))  # the endpoints tested; the rest are reported as exploratory
    for t in tests:
        t["declared"] = t["endpoint"] in declared
    for t, adjusted in zip([t for t in tests if t["declared"]], holm([t["p"] for t in tests if t["declared"]])):
        t["holm"] = adjusted
    return per_run, tests


def analyse(study: dict, data: dict) -> dict:
    """Every number of the report: the declared tests, curves and paired differences."""
    arms = list(study["arms"])
    bases = [b for b in study["endpoints"].get("baselines", []) if b in arms]
    out = {"arms": arms, "baselines": bases, "curves": {}, "paired": {}}
    for metric, per_arm in data.items():
        lower = METRICS[metric][1]
        epochs = sorted({e for seeds in per_arm.values() for c in seeds.values() for e in c})
        out["curves"][metric] = {a: {e: {"n": len(v), "mean": float(np.mean(v)), "t": t_interval(v)}
                                     for e in epochs if len(v := [c[e] for c in per_arm.get(a, {}).values()
                                                                  if e in c])} for a in arms}
        out["paired"][metric] = {b: {a: {e: summary(d, lower) for e in epochs if len(d := paired(per_arm, a, b, e))}
                                     for a in arms if a != b} for b in bases}
    out["per_run"], out["tests"] = declared_tests(study, data.get("fid", {}))
    return out


def label(metric: str, study: dict) -> str:
    """A metric's name in the report: FID in Inception's feature space, proto-FID in a classifier's."""
    name = "FID" if study["evaluation"].get("features", "inception") == "inception" else "proto-FID"
    return METRICS[metric][0].replace("FID", name)


def fmt(s: dict, digits: int) -> str:
    """'mean [t lo, hi] k/n' of a summary, with the bootstrap interval from BOOTSTRAP_MIN seeds on."""
    if s["n"] == 0:
        return "-"
    if s["n"] < 2:
        return f"{s['mean']:+.{digits}f} (n 1)"
    boot = f" [{s['bootstrap'][0]:+.{digits}f}, {s['bootstrap'][1]:+.{digits}f}]" if s.get("bootstrap") else ""
    return f"{s['mean']:+.{digits}f} [{s['t'][0]:+.{digits}f}, {s['t'][1]:+.{digits}f}]{boot} {s['ahead']}/{s['n']}"


def time_cell(run: tuple[float, str] | None) -> str:
    if run is None:
        return "-"
    return {"reached": f"{run[0]:.1f}", "never": f">{run[0]:g}", "at first": f"<={run[0]:g}"}[run[1]]


def tests_table(study: dict, result: dict) -> list[str]:
    """The declared tests' table, and the other endpoints' comparisons after it (exploratory)."""
    tests = [t for t in result["tests"] if t["declared"]]
    n = max((t["n"] for t in tests), default=0)
    most = math.ceil(0.05 / smallest_p(n)) - 1 if n else 0
    head = ["| endpoint | arm - baseline | estimate [95% t] seeds ahead/n | censored (never, at first: arm; baseline) "
            "| sign-flip p | Holm p | equivalence (90% t interval in margin) |", "|---|---|---|---|---|---|---|"]
    lines = [f"## Declared tests: {len(tests)}, Holm-corrected across all of them", "",
             f"Sign-flip p-values are exact (all 2^n sign patterns); with {n} seeds the smallest is "
             f"{smallest_p(n):.4f}, so a Holm-adjusted p below 0.05 needs at most {most} tests. Equivalence: two "
             "one-sided t tests at 5% against the declared margin (the 90% t interval inside it).", "", *head,
             *table_lines(tests)]
    others = [t for t in result["tests"] if not t["declared"]]
    if others:
        lines += ["", "Exploratory (an endpoint not declared as a test: no correction, the p-value descriptive):", "",
                  *head, *table_lines(others)]
    return lines + [""]


def table_lines(tests: list[dict]) -> list[str]:
    """One table row per test."""
    lines = []
    for t in tests:
        ratio = t["endpoint"] == "steps_to_threshold"
        estimate = ratio_cell(t) if ratio else fmt(t, 3)
        cens = "; ".join(f"{c['never']}, {c['at first']}" for c in t["censored"].values()) if ratio else "-"
        eq = t["equivalence"]
        eq_cell = "no margin declared" if not eq else (
            f"{'shown' if eq['shown'] else 'not shown'}: [{eq['interval'][0]:.3f}, {eq['interval'][1]:.3f}] in "
            f"({eq['margin'][0]:.3f}, {eq['margin'][1]:.3f}), p {eq['p']:.3f}")
        holm_cell = f"{t['holm']:.4f}" if "holm" in t else "-"
        lines.append(f"| {ENDPOINTS[t['endpoint']]} | `{t['arm']}` - `{t['baseline']}` | {estimate} | {cens} | "
                     f"{t['p']:.4f} | {holm_cell} | {eq_cell} |")
    return lines


def ratio_cell(s: dict) -> str:
    if s["n"] < 2:
        return f"{s['mean']:.2f} (n {s['n']})" if s["n"] else "-"
    boot = f" [{s['bootstrap'][0]:.2f}, {s['bootstrap'][1]:.2f}]" if s.get("bootstrap") else ""
    return f"{s['mean']:.2f} [{s['t'][0]:.2f}, {s['t'][1]:.2f}]{boot} {s['ahead']}/{s['n']}"


def markdown(study: dict, result: dict, read: dict) -> str:
    """The report's tables: the declared tests first, then the endpoints per run, then the exploratory tables."""
    arms, ends = result["arms"], study["endpoints"]
    fid, x = label("fid", study), axis(study)
    e = read["expected"]
    lines = [f"# Study {study['path']}: {study['dataset']}", "",
             f"Arms: {', '.join(f'`{a}` ({f})' for a, f in study['arms'].items())}.",
             f"Training seeds {study['train_seeds']}, classifier seeds {study.get('classifier_seeds', [0])} "
             f"(evaluation classifier seed {study['eval_classifier']['seed']}). Evaluation: {e['n']} images, "
             f"{e['features']} features (scored by {read['scorer']}), {e['sampler']} {e['steps']} steps, w {e['w']}, "
             f"{e['weights']} weights, sampling seed {e['seed']}; {read['used']} records of it read, "
             f"{read['left_out']} of other evaluations left out.",
             f"Declared endpoints: {x}s to {fid} <= {ends.get('fid_threshold')} (threshold from "
             f"{ends.get('threshold_from', 'the study file: no pilot named')}; the non-increasing fit of each curve "
             f"up to its lowest point, interpolated on log-{x}s; runs that never reach it censored at the last "
             f"evaluation, runs already there at the first), ratio to the baseline; mean {fid} over log-{x}s up to "
             f"{x} {ends.get('early_until')}. Equivalence margins: {ends.get('equivalence') or 'none declared'}.", ""]
    floor = read["floor"]
    lines += [f"Real-vs-real floor ({e['n']} real images of the {read['floor_split']} split, the same evaluation; "
              f"{read['floor_records']} records): "
              + (", ".join(f"{label(m, study)} {v:.{1 if 'accuracy' in m else 4}f}" for m, v in floor.items())
                 if floor else "not scored"), ""]
    lines += tests_table(study, result)
    reach, early = result["per_run"].get("steps_to_threshold"), result["per_run"].get("early_mean")
    if reach or early:
        lines += ["## The endpoints per training seed", "", f"| arm | {x}s to {fid} <= {ends.get('fid_threshold')} "
                  f"| mean {fid} up to {x} {ends.get('early_until')} |", "|---|---|---|"]
        for a in arms:
            r = ", ".join(time_cell(v) for _, v in sorted((reach or {}).get(a, {}).items())) or "-"
            m = ", ".join("-" if v is None else f"{v:.3f}" for _, v in sorted((early or {}).get(a, {}).items())) or "-"
            lines.append(f"| {a} | {r} | {m} |")
        lines.append("")
    lines += ["## Exploratory: every scored point, no multiplicity correction", "",
              "Cells: mean [95% t interval] seeds ahead/n (a percentile bootstrap interval after it from 10 seeds on); "
              "curves: mean [95% t band] (n). Differences are arm minus baseline, paired by training seed.", ""]
    for metric, per_arm in result["curves"].items():
        digits = 1 if "accuracy" in metric else 4 if "kid" in metric else 3
        points = sorted({p for c in per_arm.values() for p in c})
        lines += [f"### {label(metric, study)}: mean over seeds", "", f"| {x} | " + " | ".join(arms) + " |",
                  "|---" * (len(arms) + 1) + "|"]
        for p in points:
            cells = [f"{c[p]['mean']:.{digits}f} [{c[p]['t'][0]:.{digits}f}, {c[p]['t'][1]:.{digits}f}] ({c[p]['n']})"
                     if p in (c := per_arm[a]) else "-" for a in arms]
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        for base, per in result["paired"][metric].items():
            others = [a for a in arms if a != base]
            lines += ["", f"#### {label(metric, study)}: arm minus `{base}`", "",
                      f"| {x} | " + " | ".join(others) + " |", "|---" * (len(others) + 1) + "|"]
            for p in points:
                lines.append(f"| {p} | " + " | ".join(fmt(per[a][p], digits) if p in per[a] else "-"
                                                      for a in others) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


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
        if m in result["floor"]:
            axes[0][col].axhline(result["floor"][m], color="k", ls="--", lw=1, label="real-vs-real floor")
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
        ax.set_xlabel(axis(study))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{study['path']}: {study['dataset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(study: dict, runs: list, classifier_file: str | None = None) -> str:
    """Write OUT/report.md, report.json and report.png from the runs' metrics; returns a line naming them."""
    data, read = collect(runs, study, classifier_file)
    result = analyse(study, data) | {"floor": read["floor"]}
    text = markdown(study, result, read)
    out = study["out"]
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "report.md"), lambda f: f.write(text.encode()))
    write_atomic(os.path.join(out, "report.json"), lambda f: f.write(json.dumps(result, indent=1).encode()))
    if result["curves"]:
        plot(study, result, os.path.join(out, "report.png"))
    return (f"report of {read['scored_runs']}/{len(runs)} runs with scores -> {out}/report.md, report.json" +
            (", report.png" if result["curves"] else ""))
