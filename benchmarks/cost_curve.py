"""Gain over the source model against cost, for judge-driven methods run at several budgets.

Reads a results file of `tta bench` in which one method ran at several (pairs, steps) settings beside `source`
on the same images (for example benchmarks/dtta-cost-curve.yaml), pairs every setting with the source image by
image (tta.bench.stats: stratified bootstrap 95% interval, exact sign test) and writes a table and a plot of
the gain against judge evaluations per image (pairs x steps), with the measured seconds per image beside it.

    tta bench benchmarks/dtta-cost-curve.yaml --out results/dtta-cost-curve.jsonl
    python benchmarks/cost_curve.py results/dtta-cost-curve.jsonl
Writes results/dtta-cost-curve-gain.md and results/dtta-cost-curve-gain.png (next to the results file).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from collections import defaultdict
from pathlib import Path

from tta.bench.report import load_results
from tta.bench.stats import compare_rows, format_p


def judge_evaluations(config: dict) -> int:
    """(t, eps) pairs the judge denoises per image: pairs per step times steps."""
    return int(config["pairs"]) * int(config["steps"])


def curve(rows, reference: str = "source"):
    """[(label, evaluations, seconds per image, corrupted comparison, clean comparison)] sorted by cost."""
    by_label = defaultdict(list)
    for r in rows:
        by_label[r["method"]].append(r)
    if reference not in by_label:
        raise SystemExit(f"no '{reference}' rows in the results: the gain is measured against them")
    ref = by_label.pop(reference)
    points = []
    for label, rs in by_label.items():
        if "pairs" not in rs[0]["config"]:
            continue  # not a judge-driven method
        corrupted = compare_rows([r for r in rs if r.get("severity") is not None],
                                 [r for r in ref if r.get("severity") is not None], "accuracy")
        clean = compare_rows([r for r in rs if r.get("severity") is None],
                             [r for r in ref if r.get("severity") is None], "accuracy")
        seconds = sum(r["seconds"] for r in rs) / max(1, sum(r["n"] for r in rs))
        points.append((label, judge_evaluations(rs[0]["config"]), seconds, corrupted, clean))
    if not points:
        raise SystemExit("no method with a 'pairs' setting beside the source rows")
    return sorted(points, key=lambda p: (p[1], p[0]))


def _change(cmp) -> str:
    if cmp is None:
        return "not paired"
    lo, hi = cmp.ci
    return (f"{100 * cmp.delta:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], {format_p(cmp.p)}, "
            f"{cmp.verdict()}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", help="a results file with `source` and one method at several pairs x steps")
    p.add_argument("--out", help="output prefix (default: the results file without .jsonl, plus -gain)")
    args = p.parse_args(argv)
    path = Path(args.results)
    points = curve(load_results([path]))
    prefix = Path(args.out) if args.out else path.with_name(path.stem + "-gain")
    command = "python benchmarks/cost_curve.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [f"# Gain over the source model against cost: {path.name}", "", f"Command: `{command}`", "",
             "Accuracy change against the source model on the same images, in points: mean over domains, "
             "stratified bootstrap 95% interval, exact two-sided sign test; \"beats\" / \"falls below\" only "
             "at p < 0.05. Judge evaluations = (t, eps) pairs per step x steps. Seconds are wall time per image "
             "on the machine that ran the benchmark.", "",
             "| setting | judge evaluations / image | s / image | corrupted: change vs source | "
             "clean: change vs source |", "|---|---:|---:|---|---|"]
    for label, evals, seconds, corrupted, clean in points:
        lines.append(f"| {label} | {evals} | {seconds:.2f} | {_change(corrupted)} | {_change(clean)} |")
    n = points[0][3].n if points[0][3] else 0
    lines += ["", f"Corrupted: {n} paired images over {points[0][3].domains if points[0][3] else 0} domains."]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(str(prefix) + ".md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for kind, idx, color in (("corrupted", 3, "tab:red"), ("clean", 4, "tab:blue")):
        pts = [(q[1], q[idx]) for q in points if q[idx] is not None]
        xs = [e for e, _ in pts]
        ys = [100 * c.delta for _, c in pts]
        err = [[100 * (c.delta - c.ci[0]) for _, c in pts], [100 * (c.ci[1] - c.delta) for _, c in pts]]
        shift = 1.04 if kind == "clean" else 1.0  # side by side, not on top of each other
        ax.errorbar([x * shift for x in xs], ys, yerr=err, fmt="o", capsize=3, color=color, label=f"{kind} (95% CI)")
    for label, evals, _, corrupted, _ in points:
        if corrupted is not None:
            ax.annotate(label, (evals, 100 * corrupted.delta), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("judge evaluations per image (pairs x steps, log scale)")
    ax.set_ylabel("accuracy change vs source (points)")
    ax.set_title(f"Gain vs cost: {path.stem}", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(str(prefix) + ".png", dpi=110)
    print(f"wrote {prefix}.md and {prefix}.png")


if __name__ == "__main__":
    main()
