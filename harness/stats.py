"""Statistics the leaderboard reports: confidence intervals over seeds and paired comparisons.

`paired_bootstrap` compares two methods evaluated on the same test items with the same
seeds: each bootstrap replicate resamples seeds (pairs kept together) and test items (the
same items for both methods), recomputes the metric for each and takes the mean difference.
Two sources of noise - which seeds, which test items - are both in the interval, so a
difference whose interval contains 0 is flagged as within noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

Metric = Callable[[np.ndarray, np.ndarray | None], float]  # (predictions, labels) -> score


def ci95(values: Sequence[float]) -> tuple[float, float]:
    """Student-t 95% interval for the mean of per-seed scores (NaN with fewer than 2)."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(x) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def paired_bootstrap(
    a: Sequence[tuple[np.ndarray, np.ndarray | None]],
    b: Sequence[tuple[np.ndarray, np.ndarray | None]],
    metric: Metric,
    *,
    replicates: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean metric difference a - b over paired seeds, with a 95% bootstrap interval.

    a[i] and b[i] are (predictions, labels) of seed i on the same items in the same order.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same non-zero number of seeds, got {len(a)} and {len(b)}")
    n_items = len(a[0][0])
    if any(len(p) != n_items for p, _ in (*a, *b)):
        raise ValueError("every seed of both methods must score the same test items")
    observed = float(np.mean([metric(*x) - metric(*y) for x, y in zip(a, b, strict=True)]))
    rng = np.random.default_rng(seed)
    diffs = np.empty(replicates)
    for r in range(replicates):
        seeds = rng.integers(0, len(a), len(a))
        items = rng.integers(0, n_items, n_items)
        diffs[r] = np.mean(
            [metric(*_take(a[s], items)) - metric(*_take(b[s], items)) for s in seeds]
        )
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {
        "delta": observed,
        "ci_low": float(low),
        "ci_high": float(high),
        # A NaN interval (a metric undefined on some resample) says nothing: NA, not "differs".
        "within_noise": bool(low <= 0.0 <= high) if np.isfinite([low, high]).all() else None,
    }


def _take(pair: tuple[np.ndarray, np.ndarray | None], items: np.ndarray):
    predictions, labels = pair
    return predictions[items], None if labels is None else labels[items]
