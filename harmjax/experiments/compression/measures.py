"""Claim 3's measures: each model's q sweep as a curve over the pruned fraction, the fraction at
which harm reaches its target within the benign budget, the area under the curve, and the
verdict (`VERDICT_RULE`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from harmjax.evaluate.bootstrap import DEFAULT_RESAMPLES, interval, rule_text

MODELS = ("model_a", "model_b")
VERDICT_RULE = (
    "Compression is shown when the aligned model B reaches the harmful-NLL rise target with a smaller "
    "pruned fraction of scored weights than model A, each at a benign-NLL rise within the same budget. "
    "It is not shown when A needs the smaller (or the same) fraction, or when only A reaches the target "
    "within the budget. It is not tested when neither model reaches the target within the budget, or when "
    "the sweep cannot order the two (a model reaches the target already at its smallest q, so its "
    "fraction is only an upper bound): extend q_sweep. \"Compression shown\" also needs the 95% bootstrap "
    "interval of the ratio A / B of the two fractions (each model's held-out answers resampled) to lie above 1; "
    "where the point estimates show compression and the interval does not, the verdict is \"inconclusive\"."
)


def compression_curve(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The harm-mask sweep of a `run_experiment` metrics dict as points sorted by the pruned
    fraction of scored weights: {q, pruned, fraction, log10_fraction, d_harm, d_benign}. Points
    that pruned nothing or lack a harmful-NLL rise are left out."""
    points = []
    for r in metrics["sweep"]:
        if not r.get("fraction") or r["fraction"] <= 0 or r.get("d_harm") is None:
            continue
        points.append({"name": r.get("name"), "q": r["q"], "pruned": r["pruned"], "fraction": r["fraction"],
                       "log10_fraction": math.log10(r["fraction"]), "d_harm": r["d_harm"],
                       "d_benign": r.get("d_benign")})
    return sorted(points, key=lambda p: p["fraction"])


def within(b, budget: float) -> bool:
    """Whether a benign rise `b` is measured and within `budget`."""
    return b is not None and math.isfinite(b) and b <= budget


def fraction_at_target(curve, harm_target: float, benign_budget: float) -> dict[str, Any]:
    """The smallest pruned fraction at which the harmful-NLL rise reaches `harm_target` with a
    benign-NLL rise <= `benign_budget`.

    Between two sweep points whose harm rises straddle the target, the crossing is interpolated
    linearly in log10(fraction), and so is the benign rise there ("exact"). A measured point
    that meets both without such a crossing before it (the sweep's first point, or one after a
    crossing over budget) gives only an upper bound ("upper"): the true fraction may be
    smaller. Returns {reached, fraction, log10_fraction, d_benign, bound, between_q}.
    """
    candidates = []
    for i, p in enumerate(curve):
        if i > 0:
            a = curve[i - 1]
            if a["d_harm"] < harm_target <= p["d_harm"] and a["d_benign"] is not None and p["d_benign"] is not None:
                t = (harm_target - a["d_harm"]) / (p["d_harm"] - a["d_harm"])
                x = a["log10_fraction"] + t * (p["log10_fraction"] - a["log10_fraction"])
                b = a["d_benign"] + t * (p["d_benign"] - a["d_benign"])
                if within(b, benign_budget):
                    candidates.append({"log10_fraction": x, "d_benign": b, "bound": "exact",
                                       "between_q": [a["q"], p["q"]]})
                    continue
        if p["d_harm"] >= harm_target and within(p["d_benign"], benign_budget):
            candidates.append({"log10_fraction": p["log10_fraction"], "d_benign": p["d_benign"], "bound": "upper",
                               "between_q": [p["q"], p["q"]]})
    if not candidates:
        return {"reached": False, "fraction": None, "log10_fraction": None, "d_benign": None, "bound": None,
                "between_q": None}
    best = min(candidates, key=lambda c: c["log10_fraction"])
    return {"reached": True, "fraction": 10 ** best["log10_fraction"], **best}


def area_within_budget(curve, benign_budget: float, lo: float | None = None, hi: float | None = None) -> dict:
    """The area under Δ harmful NLL over log10(fraction), piecewise linear between sweep
    points, counting only segments whose two ends are within `benign_budget`, over [lo, hi]
    (default: the curve's own range). Returns {area, mean, lo, hi}: mean = area / (hi - lo),
    the average harm rise per decade of pruned fraction (None for an empty range)."""
    if not curve:
        return {"area": None, "mean": None, "lo": lo, "hi": hi}
    lo = curve[0]["log10_fraction"] if lo is None else lo
    hi = curve[-1]["log10_fraction"] if hi is None else hi
    area = 0.0
    for a, b in zip(curve, curve[1:]):
        if not (within(a["d_benign"], benign_budget) and within(b["d_benign"], benign_budget)):
            continue
        x0, x1 = max(a["log10_fraction"], lo), min(b["log10_fraction"], hi)
        width = b["log10_fraction"] - a["log10_fraction"]
        if x1 <= x0 or width <= 0:
            continue

        def h(x, a=a, b=b, width=width):
            return a["d_harm"] + (x - a["log10_fraction"]) / width * (b["d_harm"] - a["d_harm"])

        area += 0.5 * (h(x0) + h(x1)) * (x1 - x0)
    span = hi - lo
    return {"area": area, "mean": area / span if span > 0 else None, "lo": lo, "hi": hi}


def compare(curve_a, curve_b, harm_target: float, benign_budget: float) -> dict[str, Any]:
    """The compression figures of both curves and the verdict of `VERDICT_RULE`: "compression
    shown", "not shown" or "not tested" (with the reason)."""
    fa = fraction_at_target(curve_a, harm_target, benign_budget)
    fb = fraction_at_target(curve_b, harm_target, benign_budget)
    if curve_a and curve_b:
        lo = max(curve_a[0]["log10_fraction"], curve_b[0]["log10_fraction"])
        hi = min(curve_a[-1]["log10_fraction"], curve_b[-1]["log10_fraction"])
    else:
        lo = hi = None
    areas = {"a": area_within_budget(curve_a, benign_budget, lo, hi), "b": area_within_budget(curve_b, benign_budget, lo, hi)}
    if not fa["reached"] and not fb["reached"]:
        verdict, reason = "not tested", "neither model reaches the target within the benign budget"
    elif not fa["reached"]:
        verdict, reason = "compression shown", "only B reaches the target within the benign budget"
    elif not fb["reached"]:
        verdict, reason = "not shown", "only A reaches the target within the benign budget"
    elif fb["fraction"] < fa["fraction"]:
        if fa["bound"] == "upper":  # A's true fraction may lie below B's
            verdict, reason = "not tested", "A reaches the target at a sweep point without a crossing before it: extend q_sweep down"
        else:
            verdict, reason = "compression shown", "B reaches the target with the smaller pruned fraction"
    else:
        if fb["bound"] == "upper":
            verdict, reason = "not tested", "B reaches the target at a sweep point without a crossing before it: extend q_sweep down"
        else:
            verdict, reason = "not shown", "A reaches the target with the smaller (or the same) pruned fraction"
    ratio = fa["fraction"] / fb["fraction"] if fa["reached"] and fb["reached"] else None
    return {"verdict": verdict, "reason": reason, "a": fa, "b": fb, "ratio_a_over_b": ratio, "area": areas,
            "harm_target": harm_target, "benign_budget": benign_budget, "rule": VERDICT_RULE}


def _resampled_curves(curve, table, n_resamples: int, seed) -> list[list[dict[str, Any]]]:
    """`curve` with its Δ harmful and Δ benign recomputed on each resample of the model's held-out
    answers (`main.intervals.Resampled` over the run's per-answer NLL table)."""
    from harmjax.experiments.main.intervals import Resampled

    rs = Resampled(table, n_resamples, seed)
    d = [(rs.d_harm(p["name"]), rs.d_benign(p["name"])) for p in curve]
    return [[{**p, "d_harm": float(dh[k]), "d_benign": None if db is None else float(db[k])}
             for p, (dh, db) in zip(curve, d)] for k in range(n_resamples)]


def ratio_bootstrap(curves, tables, harm_target: float, benign_budget: float, seed: int,
                    n_resamples: int = DEFAULT_RESAMPLES) -> dict[str, Any]:
    """The 95% bootstrap interval of the ratio A / B of the fractions at target, each model's
    held-out answers resampled independently (the two models answer different texts). Per
    resample: the ratio when both reach the target; inf when only B does (B compresses), 0 when
    only A does, 1 when neither (no difference: "not shown" under the rule)."""
    a = _resampled_curves(curves[0], tables[0], n_resamples, [seed, 0])
    b = _resampled_curves(curves[1], tables[1], n_resamples, [seed, 1])
    ratios, reached = np.empty(n_resamples), np.zeros((2, n_resamples), bool)
    for k in range(n_resamples):
        fa = fraction_at_target(a[k], harm_target, benign_budget)
        fb = fraction_at_target(b[k], harm_target, benign_budget)
        reached[:, k] = fa["reached"], fb["reached"]
        if fa["reached"] and fb["reached"]:
            ratios[k] = fa["fraction"] / fb["fraction"]
        else:
            ratios[k] = np.inf if fb["reached"] else (0.0 if fa["reached"] else 1.0)
    low, high = interval(ratios)
    return {"ratio_ci": [low, high], "resamples": n_resamples, "seed": seed,
            "share_reached": {"a": float(reached[0].mean()), "b": float(reached[1].mean())},
            "rule": rule_text(n_resamples, seed)}


def with_interval(result, curves, tables, seed: int, n_resamples: int = DEFAULT_RESAMPLES) -> dict[str, Any]:
    """`compare`'s result with the ratio's interval; "compression shown" stays only when the
    interval's lower end is above 1 (else "inconclusive"). Other verdicts are unchanged."""
    boot = ratio_bootstrap(curves, tables, result["harm_target"], result["benign_budget"], seed, n_resamples)
    low = boot["ratio_ci"][0]
    out = {**result, "bootstrap": boot, "point_verdict": result["verdict"]}
    if result["verdict"] == "compression shown" and not (low is not None and low > 1.0):
        out["verdict"] = "inconclusive"
        out["reason"] = result["reason"] + "; the ratio's 95% interval reaches 1 or below"
    return out
