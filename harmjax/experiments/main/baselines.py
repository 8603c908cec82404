"""The benign baselines of claim 2 (issue 13 part 5).

The benign-data mask of the overlap analysis is top-q benign signed SNIP with no T_p: it
removes the weights every text needs (on the embedded model it raises harmful and benign NLL
alike, by about 12 nats/token), and most of it lies inside T_p(retain), which no harm mask
can contain. So a low category-benign Jaccard says little. The baseline built here takes the
harm masks' own procedure with benign data instead of harmful data:

    B_q = T_q(benign signed) \\ T_p(retain)      (same p, granularity and mask algebra)

  - at q = category_q it is the same-procedure counterpart of the category masks (overlap);
  - at a q searched so that its held-out benign NLL rise matches the harm mask's (the
    "matched" baseline), it is the damage-matched control: at equal benign cost, does the harm
    mask raise harmful NLL more than benign-derived weights do?

Every searched q is a unit (mask directory + evaluation JSON), so a killed stage resumes and
a rerun walks the same deterministic path through the cache.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from harmjax.experiments.core.selection import select_from_units
from harmjax.experiments.core.stages import finish_unit, fresh_dir, read_json, unit_done, write_json_atomic
from harmjax.experiments.main.verdicts import cost_matched
from harmjax.masks import jaccard_indices, load_mask_indices, save_mask
from harmjax.masks.storage import read_summary
from harmjax.sharding import param_shardings

KIND = "benign_minus_retain"


def round_q(q: float) -> float:
    """`q` to 3 significant digits: searched q's get short, stable names and cache units."""
    return float(f"{q:.3g}")


def baseline_name(q: float) -> str:
    """The report name of the baseline mask at `q`."""
    return f"benign \\ retain q={q:g}"


def match_benign_cost(cost: Callable[[float], float], target: float, q0: float, q_max: float,
                      steps: int) -> tuple[dict[float, float], float]:
    """Searches q in (0, q_max] for a mask whose benign cost `cost(q)` matches `target`.

    Starts at `q0`; doubles q (up to `q_max`) or halves it (at most `steps` times) until the
    target is bracketed, then bisects the bracket geometrically `steps` times. Stops as soon
    as a cost is within `verdicts.cost_matched`'s band. Assumes cost grows with q (more pruned
    weights, more damage), which is what the bracket relies on. Returns ({q: cost} of every
    evaluated q, the q whose cost is nearest the target; ties go to the smaller q).
    """
    points: dict[float, float] = {}

    def f(q: float) -> float:
        q = round_q(q)
        if q not in points:
            points[q] = cost(q)
        return points[q]

    def best() -> float:
        return min(points, key=lambda q: (abs(points[q] - target) if math.isfinite(points[q]) else math.inf, q))

    q = round_q(min(q0, q_max))
    lo = hi = None  # (q, cost) below / above the target

    def matched_or_bracketed(q: float) -> bool:
        """True when q's cost matches the target; otherwise q becomes the bracket's upper end
        (cost above the target) or its lower end."""
        nonlocal lo, hi
        if cost_matched(f(q), target):
            return True
        if f(q) > target:
            hi = q
        else:
            lo = q
        return False

    c = f(q)
    if cost_matched(c, target):
        return points, q
    if c < target:
        lo = q
        while hi is None and q < q_max:
            q = round_q(min(2 * q, q_max))
            if matched_or_bracketed(q):
                return points, q
    else:
        hi = q
        for _ in range(steps):
            q = round_q(q / 2)
            if cost_matched(f(q), target):
                return points, q
            if f(q) < target:
                lo = q
                break
            hi = q
    if lo is None or hi is None:  # the target is out of reach of (0, q_max]
        return points, best()
    for _ in range(steps):
        q = round_q(math.sqrt(lo * hi))
        if q in (lo, hi):  # the bracket is as tight as 3 significant digits allow
            break
        if matched_or_bracketed(q):
            return points, q
    return points, best()


def max_searched(q0: float, q_max: float, steps: int) -> int:
    """The most q's `match_benign_cost` evaluates: the start, the doublings to `q_max` or the
    halvings (at most `steps`), and `steps` bisections (a bound for the disk budget)."""
    doublings = math.ceil(math.log2(q_max / q0)) if q_max > q0 else 0
    return 1 + max(doublings, steps) + steps


def _entry(unit: str) -> dict[str, Any]:
    s = read_summary(unit)
    return {"name": s["name"], "kind": s["mask_kind"], "q": s["q"], "p": s["p"], "category": None,
            "dir": unit, "total": s["counts"]["total"], "fraction": s["fraction_pruned"],
            "fraction_params": s["fraction_pruned_params"]}


def build_baselines(
    model,
    scores: Mapping[str, str],
    directory: str,
    *,
    q0: float,
    q_max: float,
    p: float,
    granularity: str,
    seed: int,
    target: float,
    base_benign_nll: float,
    steps: int,
    evaluate: Callable[[str], dict[str, Any]],
    generate: Callable[[str], dict[str, Any]] | None,
    category_dirs: Sequence[str],
) -> dict[str, Any]:
    """Builds and evaluates the benign \\ retain baselines under `directory` (resuming from the
    units there); returns the stage info.

    `evaluate(mask_dir)` gives a mask's NLL metrics (harm_nll, benign_nll, ...), `generate`
    (or None) its generation metrics, added for the two masks the verdict uses: the same-q one
    (q = `q0`) and the matched one (benign NLL rise nearest `target`, searched as in
    `match_benign_cost` up to `q_max`). `category_dirs` are the category masks, for the mean
    Jaccard of each baseline with them.

    Returns {"target", "same_q", "matched", "masks": [entry + "metrics" file + "jaccard_category"]}
    with "same_q"/"matched" the names of those masks.
    """
    shardings = param_shardings(model.config, model.mesh)
    n_params = model.num_params()
    # Empty category masks (q too small for the matrices) say nothing about overlap: left out,
    # as in `mask_overlap`.
    categories = [c for c in (load_mask_indices(d)[0] for d in category_dirs) if sum(len(v) for v in c.values())]
    units: dict[float, str] = {}

    def unit_of(q: float) -> str:
        unit = os.path.join(directory, f"{KIND}_q{q:g}")
        if not unit_done(unit):
            mask = select_from_units(scores, "benign_signed", q, p, granularity, shardings)
            tmp = fresh_dir(unit)
            save_mask(tmp, mask, {"name": baseline_name(q), "mask_kind": KIND, "q": q, "p": p,
                                  "granularity": granularity, "seed": seed}, num_params=n_params)
            finish_unit(tmp, unit, {"name": baseline_name(q)})
        units[q] = unit
        return unit

    def metrics_of(q: float, with_generations: bool = False) -> dict[str, Any]:
        unit = unit_of(q)
        path = unit + ".json"
        metrics = read_json(path) if os.path.isfile(path) else None
        if metrics is None:
            metrics = evaluate(unit)
            write_json_atomic(path, metrics)
        if with_generations and generate is not None and "refusal_rate" not in metrics:
            metrics = {**metrics, **generate(unit)}
            write_json_atomic(path, metrics)
        return metrics

    def cost(q: float) -> float:
        return metrics_of(q)["benign_nll"] - base_benign_nll

    q_same = round_q(q0)
    cost(q_same)
    _, q_matched = match_benign_cost(cost, target, q_same, q_max, steps)
    for q in sorted({q_same, q_matched}):
        metrics_of(q, with_generations=True)

    masks = []
    for q in sorted(units):
        e = _entry(units[q])
        own = load_mask_indices(units[q])[0]
        js = [jaccard_indices(own, c) for c in categories] if e["total"] else []
        e["jaccard_category"] = sum(js) / len(js) if js else None
        e["metrics"] = os.path.basename(units[q]) + ".json"
        e["dir"] = os.path.basename(units[q])
        masks.append(e)
    return {"target": target, "same_q": baseline_name(q_same), "matched": baseline_name(q_matched), "masks": masks}
