"""Bootstrap intervals over prompts, for the verdicts of claims 1, 2, 3 and 5.

A measure is recomputed on `DEFAULT_RESAMPLES` resamples of its prompts (drawn with
replacement). Each prompt set is resampled independently of the others; where the same prompts
are measured under two models (a masked model and the unpruned one, a mask and its random
control), the same resampled indices serve both, so the interval is of the paired difference.
Within a set, `groups` (e.g. harm categories) keeps each group's size fixed (a stratified
bootstrap), matching the per-category split the held-out sets are drawn by.

Intervals are percentile intervals (default 95%) taken as order statistics (numpy's
"inverted_cdf" quantile, no interpolation). That keeps them defined when a resample's ratio is
infinite (a benign rise of zero), and makes "the interval of a ratio clears t" the same
decision as "the interval of the matching difference clears 0".

`DEFAULT_RESAMPLES = 2000`: the percentile's Monte Carlo error at 2.5% is about
sqrt(0.025 * 0.975 / 2000) = 0.35 percentage points of coverage, and each measure here is a mean
over at most a few hundred values, so 2000 resamples take milliseconds.

Reference: B. Efron and R. J. Tibshirani (1993), "An Introduction to the Bootstrap", ch. 13.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
LEVEL = 0.95


def resample_indices(size: int, n_resamples: int, rng: np.random.Generator,
                     groups: Sequence[Any] | None = None) -> np.ndarray:
    """(n_resamples, size) indices into a prompt set of `size`, drawn with replacement; with
    `groups` (one label per prompt), each group's prompts are drawn from that group only, so
    every resample keeps the group sizes (columns of a group stay at its positions)."""
    if groups is None:
        return rng.integers(0, size, (n_resamples, size)) if size else np.zeros((n_resamples, 0), np.int64)
    if len(groups) != size:
        raise ValueError(f"resample_indices: {len(groups)} group labels for {size} prompts.")
    out = np.empty((n_resamples, size), np.int64)
    labels = list(groups)
    for g in sorted(set(labels), key=str):
        members = np.array([i for i, x in enumerate(labels) if x == g])
        out[:, members] = members[rng.integers(0, len(members), (n_resamples, len(members)))]
    return out


def resample_sets(sets: Mapping[str, Any], n_resamples: int = DEFAULT_RESAMPLES,
                  seed: int = DEFAULT_SEED) -> dict[str, np.ndarray]:
    """{set name: indices of `resample_indices`} for independent prompt sets; `sets` maps a
    name to its size or to its list of group labels. One seeded Generator draws the sets in
    sorted name order, so the same seed and sets give the same indices."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(sets):
        spec = sets[name]
        out[name] = (resample_indices(int(spec), n_resamples, rng) if isinstance(spec, (int, np.integer))
                     else resample_indices(len(spec), n_resamples, rng, groups=spec))
    return out


def finite_means(values, indices: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    """Per resample (row of `indices`), the mean of the finite resampled values (NaN when none),
    the bootstrap twin of `mean_finite`; `columns` restricts it to those positions (a group)."""
    v = np.asarray(values, np.float64)
    idx = indices if columns is None else indices[:, columns]
    x = v[idx] if v.size else np.zeros(idx.shape)
    ok = np.isfinite(x)
    count = ok.sum(axis=1)
    total = np.where(ok, x, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def interval(stats, level: float = LEVEL) -> tuple[float | None, float | None]:
    """The percentile interval (order statistics) of the resampled values `stats`; NaN values
    are left out; (None, None) when none are left."""
    s = np.asarray(stats, np.float64)
    s = s[~np.isnan(s)]
    if not s.size:
        return None, None
    # Rounded: (1 - 0.95) / 2 is 0.025000000000000022 in floats, which would move the lower end
    # one order statistic up at 2000 resamples (2000 x 0.025 must be exactly 50).
    a = round((1.0 - level) / 2, 12)
    low, high = np.quantile(s, [a, 1.0 - a], method="inverted_cdf")
    return float(low), float(high)


def ratio(num, den) -> np.ndarray:
    """num / max(den, 0) elementwise, +-inf (the sign of num) where den <= 0: the ratio behind a
    rule "num >= t x max(den, 0)", whose interval decides as the difference's does."""
    num, den = np.asarray(num, np.float64), np.maximum(np.asarray(den, np.float64), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.sign(num) * np.inf)


def clears(bounds: tuple[float | None, float | None], threshold: float, strict: bool = False) -> bool:
    """Whether an interval lies wholly at or above `threshold` (above it with `strict`)."""
    low = bounds[0]
    return low is not None and (low > threshold if strict else low >= threshold)


def verdict(point: bool | None, bounds_clear: bool) -> str:
    """The three-way verdict: "shown" when the interval clears the rule's threshold,
    "inconclusive" when only the point estimate meets the rule, "not shown" when the point
    estimate fails it, "not tested" when the rule could not be applied (`point` None)."""
    if point is None:
        return "not tested"
    return "shown" if point and bounds_clear else ("inconclusive" if point else "not shown")


def fmt_interval(bounds, spec: str = "{:.3f}") -> str:
    """" [low, high]" for a report, or "" when there is no interval."""
    low, high = bounds if bounds else (None, None)
    if low is None or high is None:
        return ""
    return f" [{_fmt(low, spec)}, {_fmt(high, spec)}]"


def _fmt(x: float, spec: str) -> str:
    return ("inf" if x > 0 else "-inf") if np.isinf(x) else spec.format(x)


def rule_text(n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, level: float = LEVEL) -> str:
    """The sentence a report gives for how intervals turn into verdicts."""
    return (f"a verdict reads \"shown\" only when the {level:.0%} bootstrap interval (percentile, {n_resamples} "
            f"resamples of the held-out prompts, seed {seed}, paired where two models answer the same prompts) of "
            "every quantity of its rule clears the rule's threshold; \"inconclusive\" when the point estimates meet "
            "the rule but an interval does not clear it; \"not shown\" when the point estimates fail the rule")


__all__ = ["DEFAULT_RESAMPLES", "DEFAULT_SEED", "LEVEL", "clears", "finite_means", "fmt_interval",
           "interval", "ratio", "resample_indices", "resample_sets", "rule_text", "verdict"]
