"""Confidence intervals for rates (a count of k events in n trials): Wilson's score interval for
one rate, and Newcombe's hybrid score interval (his method 10) for the difference of two rates.

Both stay inside [0, 1] (resp. [-1, 1]), behave at k = 0 or k = n, and need no resampling,
which matters at the few dozen prompts a small run has. Newcombe's interval treats the two rates
as independent samples; for two models answering the same prompts (paired data, positively
correlated) it is conservative (wider than a paired interval).

References: E. B. Wilson (1927), JASA 22:209; R. G. Newcombe (1998), Statistics in Medicine
17:873-890 (its worked examples: 81/263 -> [0.2553, 0.3662]; 56/70 - 48/80 -> [0.0524, 0.3339]).
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | tuple[None, None]:
    """Wilson's score interval (default 95%) for the rate k / n; (None, None) when n == 0."""
    if n <= 0:
        return None, None
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}.")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_difference(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float] | tuple[None, None]:
    """Newcombe's hybrid score interval for k1/n1 - k2/n2 (two independent rates); (None, None)
    when either n is 0."""
    if n1 <= 0 or n2 <= 0:
        return None, None
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return max(-1.0, low), min(1.0, high)


def rate_summary(flags) -> dict:
    """{"k", "n", "rate", "ci_low", "ci_high"} (Wilson 95%) of a sequence of booleans."""
    flags = [bool(f) for f in flags]
    n, k = len(flags), sum(flags)
    low, high = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": (k / n) if n else None, "ci_low": low, "ci_high": high}


__all__ = ["Z95", "newcombe_difference", "rate_summary", "wilson_interval"]
