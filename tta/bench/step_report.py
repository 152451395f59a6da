"""Accuracy after each adaptation step, from rows run with `record_steps: true` (tta.bench.spec.MethodSpec).

Such rows keep, per image, the prediction after 0, 1, ..., N steps (step 0 is the unadapted model: Diffusion-TTA's
first forward pass runs before any update). With the random draws seeded per image (Diffusion-TTA without `seed`:
the runner seeds each episode) the first k steps of an N-step run are exactly a k-step run; with a `seed`, one
generator runs on across images, so later images' draws differ from a k-step run's (equally random, not equal).
So one run at N steps answers "how many steps?" for every count up to N. Each count is paired image by image with
step 0 (tta.bench.stats: bootstrap interval, exact McNemar test), corrupted domains and clean apart.
One exception: the divergence guard judges only the prediction after the last step, so where a row's guard_events
show an intervention, the counts below N are the unguarded outputs a k-step run might have replaced.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from .stats import compare_rows, format_p


def recorded_steps(rows: Sequence[dict]) -> Optional[int]:
    """N, the steps every row recorded (the fewest, if they differ); None unless every row has step records."""
    counts = []
    for r in rows:
        steps = (r.get("per_image") or {}).get("step_correct")
        if not steps:
            return None
        counts.append(min(len(s) for s in steps) - 1)
    return min(counts) if counts else None


def at_step(row: dict, k: int) -> dict:
    """The row as a k-step run would have written it: its per-image correctness and its accuracy after k steps."""
    records = row["per_image"]
    correct = [s[k] for s in records["step_correct"]]
    accuracy = sum(correct) / len(correct) if correct else None
    return {**row, "metrics": {"accuracy": accuracy},
            "per_image": {"id": records["id"], "pred": [s[k] for s in records["step_pred"]], "correct": correct}}


def _cell(rows_k: List[dict], rows_0: List[dict]) -> List[str]:
    if not rows_k:
        return ["", ""]
    cmp = compare_rows(rows_k, rows_0, "accuracy")
    if cmp is None:
        return ["", "not paired"]
    lo, hi = cmp.ci
    return [f"{100 * cmp.method_mean:.1f}",
            f"{100 * cmp.delta:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], {cmp.wins}/{cmp.losses}, {format_p(cmp.p)}"]


def step_table(rows: Sequence[dict]) -> Optional[List[List[str]]]:
    """[steps, corrupted accuracy, its change against step 0, clean accuracy, its change] per recorded step count;
    None if the rows have no step records."""
    n = recorded_steps(rows)
    if n is None:
        return None
    corrupted = [r for r in rows if r.get("severity") is not None]
    clean = [r for r in rows if r.get("severity") is None]
    table = []
    for k in range(n + 1):
        cells = [str(k)]
        for part in (corrupted, clean):
            cells += _cell([at_step(r, k) for r in part], [at_step(r, 0) for r in part])
        table.append(cells)
    return table


HEADER = ["steps", "corrupted accuracy", "change vs step 0 [95% CI], better/worse, p", "clean accuracy",
          "change vs step 0 [95% CI], better/worse, p"]


def step_sections(method_rows: Dict[str, List[dict]], markdown_table) -> List[str]:
    """Markdown: one table per method with step records (empty if none has them)."""
    md: List[str] = []
    for method, rows in method_rows.items():
        table = step_table(rows)
        if table is None:
            continue
        md += [f"**{method}: accuracy after each step** (recorded with `record_steps`; step 0 is the unadapted model; "
               "each count paired image by image with step 0)", "", markdown_table(HEADER, table), ""]
    return md
