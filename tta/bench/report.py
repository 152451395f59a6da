"""Reports generated from result rows, never typed: markdown and CSV tables (method x domain, mean, change
against the source model, mCE) and plots (per-domain bars; running accuracy against batches seen and against wall
time), written next to the results.

    tta report results/imagenet-c.jsonl        -> results/imagenet-c.md, .csv, imagenet-c-*.png
    tta compare a.jsonl b.jsonl --out results/cmp
"""
from __future__ import annotations

import csv
import math
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .metrics import MCE_BASELINES, TASK_METRICS, mean_corruption_error
from .results import read_rows, unique_rows
from .stats import compare_rows, format_p
from .step_report import at_step, recorded_steps, step_sections

FRACTIONS = {"accuracy", "error", "ece", "miou", "pixel_accuracy", "delta1", "ssim"}  # shown in percent
GROUP_FIELDS = ("benchmark", "model", "data_id", "setting")
PER_IMAGE_EQUALS_TABLE = {"accuracy", "error", "fg_ari", "ari"}  # means of per-image values, as the tables show


def _signed(metric: str, delta: float) -> str:
    return f"{_scale(metric, delta):+.1f}" if metric in FRACTIONS else f"{delta:+.3f}"


def _domain_label(row) -> str:
    return f"{row['domain']}-{row['severity']}" if row.get("severity") is not None else row["domain"]


def _fmt(metric: str, value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{100 * value:.1f}" if metric in FRACTIONS else f"{value:.3f}"


def _scale(metric: str, value: Optional[float]) -> Optional[float]:
    return None if value is None else (100 * value if metric in FRACTIONS else value)


class Group:
    """The rows of one (benchmark, model, data, setting): a method x domain table per metric."""

    def __init__(self, key: Tuple, rows: List[dict]):
        self.key = key
        self.rows = rows
        self.task = rows[0].get("task", "classification")
        self.domains: List[str] = list(OrderedDict.fromkeys(_domain_label(r) for r in rows))
        labels = self._method_labels(rows)
        self.methods: List[str] = list(OrderedDict.fromkeys(labels[id(r)] for r in rows))
        self.cells: Dict[Tuple[str, str], dict] = {}
        for r in rows:
            self.cells.setdefault((labels[id(r)], _domain_label(r)), r)
        self.method_rows = {m: [r for r in rows if labels[id(r)] == m] for m in self.methods}

    @staticmethod
    def _method_labels(rows) -> Dict[int, str]:
        """Method label; runs of one label that differ (config, or results file) become "label #1", "label #2"
        in order of appearance, and `legend()` says what each number is: labels stay short in tables and plots."""
        variants: Dict[str, List[Tuple[str, str]]] = {}
        for r in rows:
            variant = (r.get("config_id", ""), r.get("_source", ""))
            seen = variants.setdefault(r["method"], [])
            if variant not in seen:
                seen.append(variant)
        labels = {}
        for r in rows:
            seen = variants[r["method"]]
            number = seen.index((r.get("config_id", ""), r.get("_source", ""))) + 1
            labels[id(r)] = r["method"] if len(seen) == 1 else f"{r['method']} #{number}"
        return labels

    def legend(self) -> List[List[str]]:
        """[label, config id, results file, config fields that differ from the label's other runs] for the
        labels that were numbered."""
        out = []
        for m in self.methods:
            if " #" not in m:
                continue
            row = self.method_rows[m][0]
            siblings = [self.method_rows[o][0] for o in self.methods if o != m and o.rsplit(" #", 1)[0]
                        == m.rsplit(" #", 1)[0]]
            config = row.get("config") or {}
            differs = sorted(k for k in config if any((s.get("config") or {}).get(k) != config[k] for s in siblings))
            out.append([m, str(row.get("config_id", ""))[:12], str(row.get("_source", "")),
                        ", ".join(f"{k}={config[k]}" for k in differs) or "same config, other file"])
        return out

    @property
    def title(self) -> str:
        benchmark, model, data_id, setting = self.key
        return f"{benchmark} | {model} | {setting} | {data_id}"

    def value(self, method: str, domain: str, metric: str) -> Optional[float]:
        row = self.cells.get((method, domain))
        return None if row is None else row["metrics"].get(metric)

    def mean(self, method: str, metric: str) -> Optional[float]:
        """Mean over domains; None unless the method has every domain (a partial mean would mislead)."""
        values = [self.value(method, d, metric) for d in self.domains]
        if any(v is None for v in values):
            return None
        return sum(values) / len(values)

    def source_method(self) -> Optional[str]:
        for m in self.methods:
            if self.method_rows[m][0].get("adapter") == "source":
                return m
        return None

    def mce(self, method: str) -> Tuple[Optional[float], str]:
        """mCE over the corrupted domains: AlexNet-normalised where the benchmark asks for it and the five
        severities of every corruption are present, otherwise unnormalised."""
        errors = {(r["domain"], int(r["severity"])): r["metrics"]["error"] for r in self.method_rows[method]
                  if r.get("severity") is not None and r["metrics"].get("error") is not None}
        if not errors:
            return None, ""
        baseline = MCE_BASELINES.get(self.rows[0].get("mce_baseline") or "")
        if baseline:
            try:
                return mean_corruption_error(errors, baseline)["mCE"], "mCE (AlexNet)"
            except ValueError:
                pass  # not all severities / corruptions: fall back to the unnormalised mean
        return mean_corruption_error(errors)["mCE"], "mCE (unnorm.)"

    def metrics(self) -> List[Tuple[str, bool]]:
        present = {k for r in self.rows for k, v in r["metrics"].items() if v is not None}
        return [(m, up) for m, up in TASK_METRICS.get(self.task, []) if m in present]

    def table(self, metric: str) -> Tuple[List[str], List[List[str]]]:
        source = self.source_method()
        header = ["method"] + self.domains + ["mean"] + ([f"vs {source}"] if source else [])
        mce_label = ""
        if metric == "accuracy":
            mce_label = next((self.mce(m)[1] for m in self.methods if self.mce(m)[1]), "")
            if mce_label:
                header.append(mce_label)
        body = []
        for m in self.methods:
            mean = self.mean(m, metric)
            cells = [m] + [_fmt(metric, self.value(m, d, metric)) for d in self.domains] + [_fmt(metric, mean)]
            if source:
                ref = self.mean(source, metric)
                delta = None if mean is None or ref is None else mean - ref
                cells.append("" if delta is None else f"{_scale(metric, delta):+.1f}" if metric in FRACTIONS
                             else f"{delta:+.3f}")
            if mce_label:
                cells.append(_fmt("error", self.mce(m)[0]))
            body.append(cells)
        return header, body

    def summary(self, metric: str) -> List[str]:
        """One plain sentence per method: its change against the source model of this group on the same images,
        corrupted domains and clean apart, with a paired 95% interval and an exact sign/McNemar test
        (tta.bench.stats); "beats" / "falls below" only when the test is significant."""
        source = self.source_method()
        if source is None:
            return []
        higher = dict(TASK_METRICS.get(self.task, [])).get(metric, True)
        lines = []
        for m in self.methods:
            if m != source:
                lines += outcome_line(m, self.method_rows[m], source, self.method_rows[source], metric, higher)
        return lines

    def cost(self) -> List[List[str]]:
        out = []
        for m in self.methods:
            rows = self.method_rows[m]
            n = sum(r["n"] for r in rows)
            secs = sum(r["seconds_model"] for r in rows) if rows[0]["setting"] != "mixed" else rows[0]["seconds_model"]
            out.append([m, str(rows[0]["batch_size"]), str(n), f"{secs:.1f}", f"{n / secs:.2f}" if secs else "",
                        rows[0].get("device", "")])
        return out


def outcome_line(label: str, mine: List[dict], reference: str, ref: List[dict], metric: str,
                 higher: bool) -> List[str]:
    """`label` against `reference` on the same images, corrupted domains and clean apart: [] if they share none."""
    parts = []
    for corrupted, what in ((True, "corrupted domains"), (False, "clean")):
        a = [r for r in mine if (r.get("severity") is not None) == corrupted]
        b = [r for r in ref if (r.get("severity") is not None) == corrupted]
        if a and b:
            parts.append(paired_sentence(what, a, b, metric, higher))
    return [f"- **{label}** {metric} against {reference}: " + "; ".join(parts) + "."] if parts else []


def paired_sentence(what: str, mine: List[dict], ref: List[dict], metric: str, higher: bool) -> str:
    """The change of `mine` against `ref` image by image, its 95% interval and sign-test verdict, in words."""
    unit = " points" if metric in FRACTIONS else ""
    cmp = compare_rows(mine, ref, metric, higher)
    if cmp is None:  # rows without per-image records: the means, and no claim
        v = [r["metrics"].get(metric) for r in mine]
        w = [r["metrics"].get(metric) for r in ref]
        if any(x is None for x in v + w):
            return f"on {what}: incomplete"
        a, b = sum(v) / len(v), sum(w) / len(w)
        return (f"on {what} {_fmt(metric, a)} vs {_fmt(metric, b)} ({_signed(metric, a - b)}{unit}; not tested: "
                f"the rows have no per-image records, rerun them to pair the images)")
    per_image = "" if metric in PER_IMAGE_EQUALS_TABLE else f" (per-image {metric})"
    lo, hi = cmp.ci
    return (f"on {what}{per_image} ({cmp.domains} domain{'s' * (cmp.domains > 1)}, {cmp.n} images) "
            f"{_fmt(metric, cmp.method_mean)} vs {_fmt(metric, cmp.reference_mean)}, "
            f"{_signed(metric, cmp.delta)}{unit} [95% CI {_signed(metric, lo)}, {_signed(metric, hi)}], "
            f"{cmp.wins} better / {cmp.losses} worse, {format_p(cmp.p)}: **{cmp.verdict(higher)}**")


def asked_pairs(rows: Sequence[dict], pairs: Sequence[Tuple[str, str]]) -> List[str]:
    """Outcome lines for pairs of labels the user names (`--pair A B`), across groups: e.g. two models' source
    rows on the same images. Each label must name one run (one config id); the images pair by id."""
    def rows_of(label: str) -> List[dict]:
        found = [r for r in rows if r["method"] == label]
        if not found:
            labels = sorted({r["method"] for r in rows})
            raise ValueError(f"--pair: no rows labelled {label!r}; labels in these results: {', '.join(labels)}")
        if len({(r.get("config_id"), r.get("model"), r.get("benchmark")) for r in found}) > 1:
            raise ValueError(f"--pair: {label!r} labels rows of more than one run (config, model or benchmark); "
                             f"report the results files one at a time, or give the runs distinct labels")
        return found
    lines = []
    for a, b in pairs:
        mine, ref = rows_of(a), rows_of(b)
        task, metric = mine[0].get("task", "classification"), mine[0].get("primary_metric", "accuracy")
        higher = dict(TASK_METRICS.get(task, [])).get(metric, True)
        lines += outcome_line(a, mine, b, ref, metric, higher) or [f"- **{a}** and **{b}** share no domain"]
    return lines


def published_section(rows: Sequence[dict], table) -> List[str]:
    """Each entry of a published table (tta.bench.published) beside the user's runs of the same method (adapter)
    and setting on the table's benchmark and severity: yours, published and yours - published per corruption and
    on the mean, in the table's unit (the rows' accuracy converted). Says which entries and which runs have no
    match, and that an eata run whose config has no fisher_data runs as ETA. Raises ValueError when the results
    hold no row of the table's benchmark at its severity."""
    mine = [r for r in rows if r.get("benchmark") == table.benchmark and r.get("severity") == table.severity
            and r.get("domain") in table.corruptions and (r.get("metrics") or {}).get("accuracy") is not None]
    if not mine:
        benchmarks = sorted({str(r.get("benchmark")) for r in rows})
        raise ValueError(f"--published {table.path}: no rows of benchmark {table.benchmark!r} at severity "
                         f"{table.severity} with accuracy in these results (benchmarks here: {', '.join(benchmarks)}); "
                         "pass the table of the benchmark you ran, or set its `benchmark` to your benchmark's name")
    groups = group_rows(mine)
    several_models = len({g.key[1] for g in groups}) > 1
    unit = f"{table.unit} %"
    cols = table.corruptions

    def fmt(v: Optional[float], signed: bool = False) -> str:
        return "" if v is None else (f"{v:+.1f}" if signed else f"{v:.1f}")

    md = [f"## Published numbers: {Path(table.path).name}", "",
          f"{table.dataset}, severity {table.severity}, in {unit}. Each published row (method, setting [source]) "
          f"beside your runs of the same method and setting: yours, published, and the difference yours - published "
          f"per corruption and on the mean, in points. Your {table.unit} is {'100 - ' if table.unit == 'error' else ''}"
          f"100 x your rows' accuracy, averaged over seeds. Setting `any`: a stateless method, compared in every "
          f"setting you ran. The published mean is the source's own (marked * where the source prints none and it is "
          f"the mean of the printed values); yours is left blank unless your run has every corruption. Mind each "
          f"source's backbone, images and batch size (listed below): a difference may be the setup, not the method.",
          ""]
    matched_entries, unmatched_runs = set(), []
    for g in groups:
        setting = g.key[3]
        for label in g.methods:
            runs = g.method_rows[label]
            adapter = runs[0].get("adapter") or runs[0]["method"]
            entries = [e for e in table.entries if e.matches(adapter, setting)]
            # EATA without clean images for its Fisher regulariser is the paper's ETA: never silently beside EATA
            eta = adapter == "eata" and not any((r.get("config") or {}).get("fisher_data") for r in runs)
            name = (f"{label} ({adapter}, {setting}" + (f", {g.key[1]}" if several_models else "")
                    + ("; runs as ETA: no fisher_data)" if eta else ")"))
            if not entries:
                unmatched_runs.append(name)
                continue
            by_domain: Dict[str, List[float]] = {}
            for r in runs:
                by_domain.setdefault(r["domain"], []).append(table.from_accuracy(r["metrics"]["accuracy"]))
            yours = {c: sum(v) / len(v) for c, v in by_domain.items()}
            your_mean = sum(yours[c] for c in cols) / len(cols) if all(c in yours for c in cols) else None
            body = [["yours: " + name] + [fmt(yours.get(c)) for c in cols] + [fmt(your_mean)]]
            for e in entries:
                matched_entries.add(id(e))
                published_mean = e.mean(cols)
                star = "*" if e.printed_mean is None and published_mean is not None else ""
                diff_mean = None if your_mean is None or published_mean is None else your_mean - published_mean
                body.append([f"published: {e.label}"] + [fmt(e.values.get(c)) for c in cols]
                            + [fmt(published_mean) + star])
                body.append([f"yours - [{e.source}]"]
                            + [fmt(yours[c] - e.values[c], True) if c in yours and c in e.values else "" for c in cols]
                            + [fmt(diff_mean, True)])
            md += [f"**{name}**", "", _markdown_table([unit] + cols + ["mean"], body), ""]
            if eta:
                md += ["This run has no Fisher regulariser (its config has no `fisher_data`), so it is ETA, the "
                       "paper's variant without it, set beside published EATA; give `fisher_data` to run EATA.", ""]
    left = [e for e in table.entries if id(e) not in matched_entries]
    if left:
        md += ["**Published rows with no run of yours** (same method and setting): "
               + "; ".join(e.label for e in left) + ".", ""]
    if unmatched_runs:
        md += ["**Your runs with no published row**: " + "; ".join(unmatched_runs) + ".", ""]
    md += ["**Sources**:", ""]
    for name, s in table.sources.items():
        extra = "; ".join(f"{k.replace('_', ' ')} {s[k]}" for k in ("backbone", "images", "batch_size") if s.get(k))
        md.append(f"- [{name}] {s['citation']}" + (f" <{s['url']}>" if s.get("url") else "") + f". {extra}."
                  + (f" {s['note']}." if s.get("note") else ""))
    notes = [f"- {e.label}: {e.note}" for e in table.entries if e.note]
    if notes:
        md += ["", "**Notes on single rows**:", ""] + notes
    return md + [""]


def group_rows(rows: Sequence[dict]) -> List[Group]:
    groups: Dict[Tuple, List[dict]] = OrderedDict()
    for r in rows:
        groups.setdefault(tuple(r[k] for k in GROUP_FIELDS), []).append(r)
    return [Group(k, v) for k, v in groups.items()]


def _markdown_table(header: List[str], body: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


# ---- plots -------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, ax, group: Group, path: Path) -> Path:
    """Title above, legend outside the data (right), saved at a size a README shows without zooming."""
    ax.set_title(group.title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _corrupted_mean(group: Group, method: str, metric: str) -> Optional[float]:
    """Mean over the shifted domains (rows with a severity), None unless the method has all of them."""
    shifted = [d for d in group.domains if any(_domain_label(r) == d and r.get("severity") is not None
                                               for r in group.rows)]
    values = [group.value(method, d, metric) for d in shifted]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def plot_domains(group: Group, metric: str, path: Path) -> Path:
    """One bar per method and domain, plus the mean over the shifted domains (labelled with its value)."""
    plt = _plt()
    import numpy as np
    means = {m: _corrupted_mean(group, m, metric) for m in group.methods}
    domains = list(group.domains) + (["mean (shifted)"] if any(v is not None for v in means.values()) else [])
    x = np.arange(len(domains))
    width = 0.8 / max(1, len(group.methods))
    fig, ax = plt.subplots(figsize=(min(14.0, 3.0 + 0.55 * len(domains) * max(1.5, len(group.methods) / 2)), 4.2))
    for i, m in enumerate(group.methods):
        vals = [_scale(metric, group.value(m, d, metric)) for d in group.domains]
        if len(domains) > len(group.domains):
            vals.append(_scale(metric, means[m]))
        bars = ax.bar(x + i * width - 0.4 + width / 2, [v if v is not None else 0 for v in vals], width, label=m)
        if means[m] is not None and len(domains) > len(group.domains):
            last = bars.patches[-1]
            ax.annotate(f"{vals[-1]:.1f}", (last.get_x() + last.get_width() / 2, last.get_height()),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=8,
                        rotation=90)
    if len(domains) > len(group.domains):
        ax.axvline(len(group.domains) - 0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x)
    ax.set_xticklabels(domains, rotation=35, ha="right", fontsize=9)
    ax.set_ylabel(metric + (" (%)" if metric in FRACTIONS else ""))
    ax.margins(y=0.12)
    return _save(fig, ax, group, path)


def plot_steps(group: Group, path: Path) -> Path:
    """Running value of the primary metric against the batches seen (one x axis for every method, whatever its
    steps per batch), averaged over domains up to the shortest domain. Each method gets its own dash and
    marker, so methods with identical curves stay visible."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    metric = group.rows[0].get("primary_metric", "accuracy")
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "v", "D", "x", "+", "*"]
    lines = []
    for m in group.methods:
        curves = [r["curve"] for r in group.method_rows[m] if r.get("curve")]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        xs = [curves[0][i][0] for i in range(length)]
        ys = []
        for i in range(length):
            vals = [c[i][2] for c in curves if c[i][2] is not None]
            ys.append(_scale(metric, sum(vals) / len(vals)) if vals else float("nan"))
        lines.append((m, xs, ys))
    for i, (m, xs, ys) in enumerate(lines):
        ax.plot(xs, ys, ls=styles[i % len(styles)], marker=markers[i % len(markers)], markersize=4,
                markevery=max(1, len(xs) // 12), label=m)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("batches seen")
    ax.set_ylabel(f"running {metric}" + (" (%)" if metric in FRACTIONS else "") + ", mean over domains")
    return _save(fig, ax, group, path)


def plot_accuracy_by_step(group: Group, path: Path) -> Optional[Path]:
    """Accuracy after 0, 1, ..., N adaptation steps (rows run with record_steps), corrupted mean and clean, per
    method; None if no method of the group recorded steps."""
    curves = []
    for m in group.methods:
        rows = group.method_rows[m]
        n = recorded_steps(rows)
        if n is None:
            continue
        for corrupted, part in ((True, "corrupted"), (False, "clean")):
            chosen = [r for r in rows if (r.get("severity") is not None) == corrupted]
            if chosen:
                ys = [100 * sum(at_step(r, k)["metrics"]["accuracy"] for r in chosen) / len(chosen)
                      for k in range(n + 1)]
                curves.append((f"{m}, {part}", ys, "-" if corrupted else "--"))
    if not curves:
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, ys, style in curves:
        ax.plot(range(len(ys)), ys, ls=style, marker="o", markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("adaptation steps (0: the unadapted model)")
    ax.set_ylabel("accuracy (%), mean over domains")
    return _save(fig, ax, group, path)


def plot_time(group: Group, path: Path) -> Path:
    """Mean primary metric over domains against the model's total wall time (adaptation + prediction)."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, NullFormatter
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    metric = group.rows[0].get("primary_metric", "accuracy")
    for cost, m in zip(group.cost(), group.methods):
        mean = group.mean(m, metric)
        if mean is not None:
            ax.scatter([float(cost[3])], [_scale(metric, mean)], label=m, s=40)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # "2", not "2x10^0"
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("model wall time, s (log scale)")
    ax.set_ylabel(f"mean {metric}" + (" (%)" if metric in FRACTIONS else "") + ", all domains")
    ax.margins(x=0.15, y=0.15)
    return _save(fig, ax, group, path)


# ---- the report ----------------------------------------------------------------------------------------------
def load_results(paths: Sequence) -> List[dict]:
    rows = []
    for p in paths:
        for r in unique_rows(read_rows(p), str(p)):
            r["_source"] = Path(p).stem
            rows.append(r)
    if not rows:
        raise ValueError(f"no result rows in {', '.join(map(str, paths))}; run `tta bench` first")
    return rows


def write_report(paths: Sequence, out: Optional[str] = None, plots: bool = True,
                 command: Optional[str] = None, pairs: Sequence[Tuple[str, str]] = (),
                 published: Optional[str] = None) -> Dict[str, List[Path]]:
    """Write <out>.md, <out>.csv and <out>-*.png (out defaults to the first results file without suffix);
    `command`, the command line that produced the report, heads it; `pairs` of labels are compared image by
    image in a section of their own (asked_pairs), whatever group their rows are in; `published`, a published
    table (benchmarks/published/*.yaml), is set beside the matching runs (published_section)."""
    paths = [Path(p) for p in paths]
    rows = load_results(paths)
    asked = asked_pairs(rows, pairs)  # before anything is written: a wrong label leaves old reports alone
    beside: List[str] = []
    if published is not None:  # also before anything is written: a bad table leaves old reports alone
        from .published import load_published
        beside = published_section(rows, load_published(published))
    prefix = Path(out) if out else paths[0].with_suffix("")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    groups = group_rows(rows)
    md = [f"# Results: {', '.join(p.name for p in paths)}", ""]
    if command:
        md += [f"Command: `{command}`", ""]
    md += ["Generated by `tta report` from the result rows; do not edit by hand. Accuracy, ECE, mIoU, pixel accuracy, "
          "delta1 and SSIM in percent; AbsRel, RMSE, ARI and FG-ARI as they are. In the tables, `vs source` is the "
          "change of the mean over all domains (clean included) against the unadapted model, and a mean is left "
          "blank unless the method has every domain. The outcome lines pair each method with the source model "
          "image by image, corrupted domains and clean apart: the change, its 95% bootstrap interval (images "
          "resampled within each domain) and an exact two-sided sign test (McNemar's for right/wrong); they say "
          "\"beats\" or \"falls below\" only at p < 0.05.", ""]
    csv_rows: List[List[str]] = []
    domain_union = list(OrderedDict.fromkeys(d for g in groups for d in g.domains))
    images: List[Path] = []
    for gi, g in enumerate(groups):
        md += [f"## {g.title}", ""]
        source = g.source_method()
        primary_metric = g.rows[0].get("primary_metric", "accuracy")
        summary = g.summary(primary_metric)
        if summary:
            md += ["**Outcome against the source model** (same model, setting and images, paired):", ""]
            md += summary + [""]
        for metric, higher in g.metrics():
            header, body = g.table(metric)
            md += [f"**{metric}** ({'higher' if higher else 'lower'} is better)", "", _markdown_table(header, body), ""]
            for cells in body:
                by_domain = dict(zip(g.domains, cells[1:1 + len(g.domains)]))
                tail = cells[1 + len(g.domains):]
                csv_rows.append([*g.key, metric, cells[0]] + [by_domain.get(d, "") for d in domain_union]
                                + [tail[0], tail[1] if source else ""])
        md += step_sections(g.method_rows, _markdown_table)
        legend = g.legend()
        if legend:
            md += ["**Labels**: one method run in several ways is numbered; what each number is:", "",
                   _markdown_table(["label", "config id", "results file", "differs in"], legend), ""]
        cost_header = ["method", "batch size", "images", "model seconds", "images/s", "device"]
        md += ["**cost**", "", _markdown_table(cost_header, g.cost()), ""]
        if plots:
            primary = g.rows[0].get("primary_metric", "accuracy")
            stem = f"{prefix.name}-{gi}-{g.key[3]}"
            made = [plot_domains(g, primary, prefix.parent / f"{stem}-domains.png"),
                    plot_steps(g, prefix.parent / f"{stem}-steps.png"),
                    plot_time(g, prefix.parent / f"{stem}-time.png")]
            by_step = plot_accuracy_by_step(g, prefix.parent / f"{stem}-by-step.png")
            made += [by_step] if by_step is not None else []
            images += made
            md += [f"![{p.stem}]({p.name})" for p in made] + [""]
        revs = sorted({str(r.get("git")) for r in g.rows})
        md += [f"_{len(g.rows)} rows; git {', '.join(revs)}; seeds {sorted({r['seed'] for r in g.rows})}_", ""]
    if asked:
        md += ["## Paired comparisons asked for", "",
               "Pairs named on the command line (`--pair A B`), image by image on the images both have:", ""]
        md += asked + [""]
    md += beside
    md_path, csv_path = Path(f"{prefix}.md"), Path(f"{prefix}.csv")
    md_path.write_text("\n".join(md))
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(GROUP_FIELDS) + ["metric", "method"] + domain_union + ["mean", "vs_source"])
        w.writerows(csv_rows)
    return {"markdown": [md_path], "csv": [csv_path], "plots": images}
