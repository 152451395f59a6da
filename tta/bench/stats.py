"""Paired statistics: is a method's change against the source model on the same images more than chance?

Every comparison pairs the two runs image by image (the per-image records the runner stores with each row:
the image's index in its domain and its score, for classification whether it was right). From the pairs:

- the change: the mean over domains of each domain's mean per-image difference (for top-1 accuracy this is the
  difference of the domains' mean accuracies, as the report's tables show it);
- a 95% interval for that change by a stratified bootstrap: images resampled with replacement within each
  domain, so every domain keeps its size and weight (Efron & Tibshirani 1993, percentile interval);
- an exact two-sided sign test on the images whose outcome differs. For right/wrong outcomes this is McNemar's
  exact test (the discordant pairs: right after and wrong before, or the reverse); for scores (mIoU, ARI) it is
  the sign test of the per-image differences, ties left out.

A verdict says "beats" or "falls below" only when the test is significant at `alpha`; otherwise "no significant
change". The interval and the test can disagree near the boundary; the verdict follows the exact test.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from math import comb
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

ALPHA = 0.05
BOOTSTRAP_SAMPLES = 10_000


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided p-value of `wins` against `losses` under p = 1/2 (ties already left out)."""
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be non-negative, got {wins} and {losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(wins, losses) + 1))
    return float(min(Fraction(1), 2 * Fraction(tail, 2 ** n)))


def stratified_bootstrap_ci(diffs: Sequence[np.ndarray], samples: int = BOOTSTRAP_SAMPLES, level: float = 0.95,
                            seed: int = 0) -> Tuple[float, float]:
    """Percentile interval of the mean over strata of each stratum's mean difference, resampling within strata."""
    rng = np.random.default_rng(seed)
    totals = np.zeros(samples)
    for d in diffs:
        d = np.asarray(d, dtype=np.float64)
        if d.size == 0:
            raise ValueError("a stratum without pairs cannot be resampled")
        # in chunks of about 2**24 draws, so a 50,000-image domain does not ask for gigabytes at once
        chunk = max(1, 2 ** 24 // d.size)
        for start in range(0, samples, chunk):
            m = min(chunk, samples - start)
            totals[start:start + m] += d[rng.integers(0, d.size, size=(m, d.size))].mean(axis=1)
    totals /= len(diffs)
    lo, hi = np.quantile(totals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass
class PairedComparison:
    """A method against a reference on the images both ran on (pooled over the given domains)."""
    n: int                      # paired images
    domains: int
    method_mean: float          # mean over domains of the method's per-image score
    reference_mean: float
    delta: float                # method_mean - reference_mean
    ci: Tuple[float, float]     # 95% bootstrap interval of delta
    wins: int                   # images where the method does better
    losses: int                 # images where it does worse
    p: float                    # exact two-sided sign / McNemar p-value
    unpaired: int = 0           # images of either run without a partner in the other (left out)

    def verdict(self, higher_is_better: bool = True, alpha: float = ALPHA) -> str:
        better = self.delta if higher_is_better else -self.delta
        if self.p < alpha and better > 0:
            return "beats"
        if self.p < alpha and better < 0:
            return "falls below"
        return "no significant change"


def per_image_scores(row: dict, metric: str) -> Optional[Dict[int, float]]:
    """{image id: score} of a row for `metric` (accuracy from the per-image correctness), or None when the row
    has no per-image records for it (rows written before they existed, or a metric that is pooled)."""
    records = row.get("per_image")
    if not records or "id" not in records:
        return None
    field = {"accuracy": "correct", "error": "correct"}.get(metric, metric)
    if field not in records:
        return None
    values = records[field]
    if metric == "error":
        values = [1 - v for v in values]
    return {int(i): float(v) for i, v in zip(records["id"], values) if v == v}  # NaN: no score for that image


def compare_rows(method_rows: Sequence[dict], reference_rows: Sequence[dict], metric: str,
                 higher_is_better: bool = True, seed: int = 0) -> Optional[PairedComparison]:
    """Pair the rows of two methods by (domain, severity, seed) and their images by id; None if any row has
    no per-image records or no domain pairs up."""
    def by_domain(rows):
        out = {}
        for r in rows:
            scores = per_image_scores(r, metric)
            if scores is None:
                return None
            out[(r["domain"], r.get("severity"), r.get("seed"))] = scores
        return out

    mine, ref = by_domain(method_rows), by_domain(reference_rows)
    if not mine or not ref:
        return None
    diffs: List[np.ndarray] = []
    method_means, reference_means = [], []
    unpaired = 0
    for key, scores in mine.items():
        other = ref.get(key)
        if other is None:
            return None  # a domain without its reference: the comparison would not be over the same images
        common = sorted(scores.keys() & other.keys())
        unpaired += len(scores) + len(other) - 2 * len(common)
        if not common:
            return None
        a = np.array([scores[i] for i in common])
        b = np.array([other[i] for i in common])
        diffs.append(a - b)
        method_means.append(a.mean())
        reference_means.append(b.mean())
    d_all = np.concatenate(diffs)
    sign = 1 if higher_is_better else -1
    wins, losses = int((sign * d_all > 0).sum()), int((sign * d_all < 0).sum())
    return PairedComparison(
        n=int(d_all.size), domains=len(diffs), method_mean=float(np.mean(method_means)),
        reference_mean=float(np.mean(reference_means)), delta=float(np.mean([d.mean() for d in diffs])),
        ci=stratified_bootstrap_ci(diffs, seed=seed), wins=wins, losses=losses, p=sign_test_p(wins, losses),
        unpaired=unpaired)


def format_p(p: float) -> str:
    """"p = 0.024", or "p < 1e-4" below what the report shows."""
    return f"p = {p:.2g}" if p >= 1e-4 else "p < 1e-4"
