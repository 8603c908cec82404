"""Averages shared by the experiments' measurements."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from harmjax.data.records import Example


def mean_finite(x) -> float:
    """The mean of the finite values of `x` (NaN when there are none)."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def mean_per_category(examples: Sequence[Example], values) -> dict[str, float]:
    """{category: mean of its examples' finite values}, sorted by category."""
    cats: dict[str, list[float]] = {}
    for e, v in zip(examples, values):
        cats.setdefault(e.category, []).append(float(v))
    return {c: mean_finite(v) for c, v in sorted(cats.items())}
