"""Bootstrap intervals for claim 5's 2 x 2 cells (`harmjax.evaluate.bootstrap`).

Five prompt sets are resampled independently: the held-out harmful answers (NLL under the
attack), the benign answers, the explanations, the held-out harmful prompts (refusal flags and
recognition log-odds) and the held-out benign prompts (recognition log-odds). Every mask, its
random control and the unmasked model are read at the same indices (paired). A cell's excess
over its control is then shown "affected" only when its whole interval lies beyond the effect
threshold, and "spared" only when its whole interval lies inside the sparing bound (an
equivalence test): a wide interval can show neither.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harmjax.evaluate.bootstrap import DEFAULT_RESAMPLES, finite_means, interval, resample_sets, rule_text
from harmjax.evaluate.refusal import is_refusal
from harmjax.experiments.dissociation.measures import CONTROL

SETS = {"harm_nll": "harm_answers", "benign_nll": "benign_answers", "explanation_nll": "explanations"}


def _auroc(h: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, the Mann-Whitney AUROC of rows of `h` (positives) against rows of `b`."""
    greater = (h[:, :, None] > b[:, None, :]).mean(axis=(1, 2))
    ties = (h[:, :, None] == b[:, None, :]).mean(axis=(1, 2))
    return greater + 0.5 * ties


class Resampled:
    """Per-resample values of each behaviour of each mask, all at the same resampled indices."""

    def __init__(self, results, refusal_metric: str, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0):
        self.results, self.refusal_metric = results, refusal_metric
        none = results["none"]
        sizes = {SETS[k]: len(v) for k, v in none["per_prompt"].items()}
        sizes.update(heldout=len(none["samples"]), benign_heldout=len(none["benign_recognition_logodds"]))
        self.idx = resample_sets(sizes, n_resamples, seed)

    def value(self, name: str, key: str) -> np.ndarray:
        """Behaviour `key` ("harm_nll", "benign_nll", "explanation_nll", "refusal_rate", "auroc")
        of mask `name` per resample."""
        r = self.results[name]
        if key in SETS:
            return finite_means(r["per_prompt"][key], self.idx[SETS[key]])
        if key == "refusal_rate":
            phrase = self.refusal_metric == "refusal_rate_phrase"
            flags = np.array([bool(is_refusal(s["answer"], min_words=0)) if phrase else bool(s["refused"])
                              for s in r["samples"]], np.float64)
            return flags[self.idx["heldout"]].mean(axis=1)
        lo_h = np.array([s["recognition_logodds"] for s in r["samples"]], np.float64)
        lo_b = np.asarray(r["benign_recognition_logodds"], np.float64)
        return _auroc(lo_h[self.idx["heldout"]], lo_b[self.idx["benign_heldout"]])

    def excess(self, mask: str, key: str) -> np.ndarray:
        """The mask's change from the unmasked model minus its random control's, per resample."""
        base = self.value("none", key)
        return (self.value(mask, key) - base) - (self.value(CONTROL[mask], key) - base)


def _above(ci, t) -> bool:
    return ci[0] is not None and ci[0] > t


def _below(ci, t) -> bool:
    return ci[1] is not None and ci[1] < t


def _inside(ci, t) -> bool:
    return ci[0] is not None and -t < ci[0] and ci[1] < t


def with_intervals(v: dict[str, Any], results, rule, seed: int, n_resamples: int = DEFAULT_RESAMPLES) -> dict:
    """`measures.verdict`'s result with an interval for every excess its cells use, each cell's
    "clears" (every interval on the rule's side of its threshold) and the outcome on cells that
    hold and clear; the point-estimate outcome is kept as point_outcome."""
    rs = Resampled(results, v["refusal_metric"], n_resamples, seed)
    ci = {m: {k: list(interval(rs.excess(m, k))) for k in ("harm_nll", "benign_nll", "explanation_nll",
                                                           "refusal_rate", "auroc")} for m in CONTROL}
    h, r = ci["harm"], ci["refusal"]
    clear = {
        "harm_mask/harmful_generation": _above(h["harm_nll"], rule.harm_nll_effect)
        and _below(h["benign_nll"], rule.benign_nll_max),
        "harm_mask/refusal_recognition": _inside(h["refusal_rate"], rule.rate_spared)
        and _inside(h["auroc"], rule.auroc_spared) and _below(h["explanation_nll"], rule.nll_spared),
        "refusal_mask/harmful_generation": _inside(r["harm_nll"], rule.nll_spared),
        "refusal_mask/refusal_recognition": _below(r["refusal_rate"], -rule.rate_effect),
    }
    cells = {k: {**c, "clears": bool(clear[k]), "shown": bool(c["holds"] and clear[k])} for k, c in v["cells"].items()}
    harm_row = cells["harm_mask/harmful_generation"]["shown"] and cells["harm_mask/refusal_recognition"]["shown"]
    ref_row = cells["refusal_mask/harmful_generation"]["shown"] and cells["refusal_mask/refusal_recognition"]["shown"]
    outcome = ("double dissociation" if harm_row and ref_row else
               "single dissociation (the harm mask is selective; the refusal mask is not)" if harm_row else
               "single dissociation (the refusal mask is selective; the harm mask is not)" if ref_row else
               "no dissociation shown")
    if outcome != v["outcome"]:
        outcome += f" (inconclusive: on point estimates, {v['outcome']})"
    return {**v, "cells": cells, "excess_ci": ci, "point_outcome": v["outcome"], "outcome": outcome,
            "harm_row": harm_row, "refusal_row": ref_row, "double": harm_row and ref_row,
            "bootstrap": {"resamples": n_resamples, "seed": seed, "rule": rule_text(n_resamples, seed)}}
