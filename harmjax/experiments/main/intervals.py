"""Bootstrap intervals for the main experiment's claims 1 and 2 (`harmjax.evaluate.bootstrap`).

The held-out harmful answers are resampled within their categories, the held-out benign
answers as one set, independently of each other; every mask's NLLs and the unpruned model's
are read at the same resampled answers (paired). Each rule quantity gets a 95% percentile
interval, and a verdict is "shown" only when every interval of its rule clears its threshold
(`bootstrap.verdict`). The masks' Jaccard overlaps are properties of the masks, not of the
held-out prompts, so the overlap verdicts have no interval.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harmjax.errors import HarmjaxError
from harmjax.evaluate.bootstrap import (
    DEFAULT_RESAMPLES, clears, finite_means, interval, ratio, resample_sets, rule_text, verdict,
)
from harmjax.experiments.main.verdicts import (
    MIN_HARM_RISE, SELECTIVE_RATIO, TRANSFER_RATIO, claim1_holds,
)


def per_prompt_table(results) -> dict[str, Any]:
    """The per-answer NLLs of every evaluated model in `results` (evaluation metrics with
    "per_prompt"), in one table: {harm_ids, harm_categories, benign_ids, nll: {name: {harm,
    benign}}}; kept in metrics.json so claim 3 and a reader can bootstrap from it."""
    base = results["unpruned"]["per_prompt"]
    table = {"harm_ids": base["harm_ids"], "harm_categories": base["harm_categories"],
             "benign_ids": base.get("benign_ids", []), "nll": {}}
    for name, r in results.items():
        pp = r.get("per_prompt")
        if pp is None:
            continue
        if pp["harm_ids"] != table["harm_ids"] or ("benign_ids" in pp and pp["benign_ids"] != table["benign_ids"]):
            raise HarmjaxError(f"per-prompt NLLs of {name!r} are not on the unpruned model's held-out answers.")
        table["nll"][name] = {"harm": pp["harm_nll"], "benign": pp.get("benign_nll")}
    return table


class Resampled:
    """Per-resample mean NLLs of the models of a `per_prompt_table`, all at the same indices."""

    def __init__(self, table, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0):
        self.table, self.n, self.seed = table, n_resamples, seed
        self.idx = resample_sets({"harmful": table["harm_categories"], "benign": len(table["benign_ids"])},
                                 n_resamples, seed)
        cats = np.asarray(table["harm_categories"], dtype=object)
        self.columns = {c: np.flatnonzero(cats == c) for c in sorted(set(table["harm_categories"]))}

    def harm(self, name: str, category: str | None = None) -> np.ndarray | None:
        """Mean harmful-answer NLL of model `name` (of one category's answers) per resample."""
        nll = self.table["nll"].get(name)
        if nll is None:
            return None
        return finite_means(nll["harm"], self.idx["harmful"], None if category is None else self.columns[category])

    def benign(self, name: str) -> np.ndarray | None:
        """Mean benign-answer NLL of model `name` per resample (None when not measured)."""
        nll = self.table["nll"].get(name)
        if nll is None or not nll.get("benign"):
            return None
        return finite_means(nll["benign"], self.idx["benign"])

    def d_harm(self, name, category=None):
        """Rise of the harmful NLL over the unpruned model's, per resample (paired)."""
        h, b = self.harm(name, category), self.harm("unpruned", category)
        return None if h is None or b is None else h - b

    def d_benign(self, name):
        """Rise of the benign NLL over the unpruned model's, per resample (paired)."""
        h, b = self.benign(name), self.benign("unpruned")
        return None if h is None or b is None else h - b


def _ci(x) -> list[float | None] | None:
    return None if x is None else list(interval(x))


def _mean_rows(arrays) -> np.ndarray | None:
    """Per resample, the mean of the finite values over a list of per-resample arrays."""
    arrays = [a for a in arrays if a is not None]
    if not arrays:
        return None
    x = np.stack(arrays)
    ok = np.isfinite(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok.any(0), np.where(ok, x, 0).sum(0) / np.maximum(ok.sum(0), 1), np.nan)


def claim1_intervals(c1, sweep, random, rs: Resampled) -> dict[str, Any]:
    """Claim 1 with intervals: each sweep and random row gains "ci" (d_harm, d_benign,
    selectivity, and for sweep rows vs_random = Δharm - SELECTIVE_RATIO x max(random Δharm, 0)
    and "clears"); the verdict is "shown" at the smallest q whose rule holds and whose
    intervals all clear it."""
    for r in random:
        r["ci"] = {"d_harm": _ci(rs.d_harm(r["name"])), "d_benign": _ci(rs.d_benign(r["name"]))}
    rnd = {r["q"]: r for r in random}
    for r in sweep:
        dh, db = rs.d_harm(r["name"]), rs.d_benign(r["name"])
        ctrl = rnd.get(r["q"])
        dc = rs.d_harm(ctrl["name"]) if ctrl else None
        ci = {"d_harm": _ci(dh), "d_benign": _ci(db), "selectivity": _ci(None if db is None else ratio(dh, db)),
              "vs_random": _ci(None if dc is None else dh - SELECTIVE_RATIO * np.maximum(dc, 0.0))}
        r["ci"] = ci
        r["clears"] = bool(dh is not None and clears(ci["d_harm"], MIN_HARM_RISE)
                           and (db is None or clears(ci["selectivity"], SELECTIVE_RATIO))
                           and (dc is None or clears(ci["vs_random"], 0.0)))
    holds = [r for r in sweep if claim1_holds(r, rnd.get(r["q"]))]
    shown = next((r for r in holds if r["clears"]), None)
    word = verdict(bool(holds), shown is not None)
    return {**c1, "point_supported": c1["supported"], "supported": shown is not None, "verdict": word,
            "smallest_selective": shown or c1["smallest_selective"],
            "interval_rule": (f"the intervals of Δharm (lower end >= {MIN_HARM_RISE}), of the selectivity Δharm / "
                              f"max(Δbenign, 0) (>= {SELECTIVE_RATIO}) and of Δharm - {SELECTIVE_RATIO} x max(random "
                              "Δharm, 0) (>= 0) clear their thresholds at one q")}


def transfer_intervals(c2, transfer, rs: Resampled) -> dict[str, Any]:
    """Claim 2's transfer with intervals of the diagonal, off-diagonal and benign means."""
    rows, cols = transfer["rows"], transfer["cols"]
    diag = _mean_rows([rs.d_harm(r, r) for r in rows if r in cols])
    off = _mean_rows([rs.d_harm(r, c) for r in rows for c in cols if c != r])
    ben = _mean_rows([rs.d_benign(r) for r in rows])
    ok = (diag is not None and off is not None and clears(interval(diag), MIN_HARM_RISE)
          and clears(interval(off - TRANSFER_RATIO * diag), 0.0)
          and (ben is None or clears(interval(off - SELECTIVE_RATIO * np.maximum(ben, 0.0)), 0.0)))
    word = verdict(c2["transfer_supported"], ok)
    return {"transfer_ci": {"diagonal": _ci(diag), "off_diagonal": _ci(off), "benign": _ci(ben)},
            "point_transfer_supported": c2["transfer_supported"], "transfer_supported": word == "shown",
            "transfer_verdict": word}


def distinct_intervals(c2, rs: Resampled) -> dict[str, Any]:
    """Claim 2's "distinct at matched benign cost" with intervals of both masks' harmful rise per
    unit benign rise (benign rises below MIN_HARM_RISE count as MIN_HARM_RISE)."""
    harm, matched = c2.get("harm_mask"), c2.get("baseline_matched")
    point = c2.get("distinct_supported")
    if point is None or not harm or not matched:
        return {"distinct_verdict": verdict(None, False)}
    dh = rs.d_harm(harm["name"])
    unit_h = dh / np.maximum(rs.d_benign(harm["name"]), MIN_HARM_RISE)
    unit_b = rs.d_harm(matched["name"]) / np.maximum(rs.d_benign(matched["name"]), MIN_HARM_RISE)
    ok = clears(interval(dh), MIN_HARM_RISE) and clears(interval(unit_h - SELECTIVE_RATIO * np.maximum(unit_b, 0)), 0)
    word = verdict(point, ok)
    return {"distinct_ci": {"harm_d_harm": _ci(dh), "harm_per_unit": _ci(unit_h), "baseline_per_unit": _ci(unit_b)},
            "point_distinct_supported": point, "distinct_supported": word == "shown", "distinct_verdict": word}


def with_intervals(c1, c2, sweep, random, transfer, results, seed: int,
                   n_resamples: int = DEFAULT_RESAMPLES) -> tuple[dict, dict, dict]:
    """Claims 1 and 2 with their intervals and three-way verdicts, and the per-prompt table
    they were drawn from. The overlap verdicts stay on the masks' Jaccards (no interval)."""
    table = per_prompt_table(results)
    rs = Resampled(table, n_resamples, seed)
    c1 = claim1_intervals(c1, sweep, random, rs)
    c2 = {**c2, **transfer_intervals(c2, transfer, rs), **distinct_intervals(c2, rs),
          "overlap_verdict": verdict(c2["overlap_supported"], True),
          "overlap_vs_baseline_verdict": verdict(c2.get("overlap_vs_baseline_supported"), True)}
    bootstrap = {"resamples": n_resamples, "seed": seed, "level": 0.95, "rule": rule_text(n_resamples, seed)}
    return c1, c2, {**bootstrap, "per_prompt": table}
