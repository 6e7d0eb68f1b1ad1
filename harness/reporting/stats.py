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


def clip_interval(
    low: float, high: float, value_range: tuple[float, float]
) -> tuple[float, float, bool]:
    """(low, high) cut to the values the metric can take, and whether an end was cut.

    A t-interval over few seeds can run past what any mean of the metric can reach (above 1
    for an accuracy); the cut interval says what is possible, the flag that the raw one was
    wider. A non-finite interval (fewer than 2 seeds) is returned as it is, not cut."""
    if not np.isfinite([low, high]).all():
        return low, high, False
    floor, ceiling = value_range
    clipped = bool(low < floor or high > ceiling)
    return float(np.clip(low, floor, ceiling)), float(np.clip(high, floor, ceiling)), clipped


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


def paired_seed_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    statistic: Callable[[np.ndarray], float],
    *,
    replicates: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """statistic(a) - statistic(b) with a 95% bootstrap interval over paired seeds.

    a[i] and b[i] are seed i's values (a number, or a row of numbers, e.g. one per LR); each
    replicate resamples seed indices with replacement, the same ones for both sides, and
    recomputes the difference. Only seed noise is in this interval (no test-item resampling):
    it is the one for statistics of per-seed numbers such as training losses."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b) or not len(a):
        raise ValueError(f"need the same non-zero number of seeds, got {len(a)} and {len(b)}")
    observed = float(statistic(a) - statistic(b))
    rng = np.random.default_rng(seed)
    diffs = np.empty(replicates)
    for r in range(replicates):
        pick = rng.integers(0, len(a), len(a))
        diffs[r] = statistic(a[pick]) - statistic(b[pick])
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {
        "delta": observed,
        "ci_low": float(low),
        "ci_high": float(high),
        "within_noise": bool(low <= 0.0 <= high) if np.isfinite([low, high]).all() else None,
    }


def direction_verdict(ci_low: float, ci_high: float, claimed_sign: int) -> str | None:
    """'supported' when the 95% interval excludes 0 on the claimed side (claimed_sign +1:
    delta > 0 claimed, -1: delta < 0 claimed), 'contradicted' when it excludes 0 on the other
    side, 'within noise' when it contains 0; None for a non-finite interval."""
    if claimed_sign not in (1, -1):
        raise ValueError(f"claimed_sign must be +1 or -1, got {claimed_sign}")
    if not np.isfinite([ci_low, ci_high]).all():
        return None
    low, high = claimed_sign * ci_low, claimed_sign * ci_high
    low, high = min(low, high), max(low, high)
    if low > 0:
        return "supported"
    if high < 0:
        return "contradicted"
    return "within noise"
