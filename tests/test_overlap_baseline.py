"""Claim 2's benign baselines (issue 13 part 5): the benign \\ retain mask against an independent
NumPy top-k set difference (candidate and dense score units), the benign-cost search, and the
verdict rules on constructed metrics, each made to go both ways."""

import math

import numpy as np
import pytest

from harmjax.masks import save_candidates, save_scores, top_candidates
from harmjax.experiments.core.selection import select_from_units
from harmjax.experiments.main.baselines import match_benign_cost
from harmjax.experiments.main.verdicts import (
    MATCH_TOLERANCE, MIN_HARM_RISE, OVERLAP_RATIO, SELECTIVE_RATIO, baseline_rows, claim2_baselines, cost_matched,
    per_unit,
)
from harmjax.tree import flatten, unflatten

SHAPES = {"model.layers.0.self_attn.q_proj.weight": (12, 20), "model.layers.0.mlp.down_proj.weight": (20, 36),
          "model.layers.1.mlp.up_proj.weight": (36, 20)}


def numpy_benign_minus_retain(benign, retain, q, p):
    """T_q(benign) \\ T_p(retain) per matrix by a plain argsort (distinct scores: no ties)."""
    out = {}
    for name, x in benign.items():
        n = x.size
        top_q = np.argsort(-x.reshape(-1), kind="stable")[: math.floor(q * n)]
        top_p = np.argsort(-retain[name].reshape(-1), kind="stable")[: math.floor(p * n)]
        out[name] = np.sort(np.setdiff1d(top_q, top_p))
    return out


@pytest.mark.parametrize("units", ["candidates", "dense"])
def test_benign_minus_retain_is_the_numpy_set_difference(units, tmp_path):
    rng = np.random.default_rng(0)
    benign = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    # Retain scores correlated with benign ones, as the same data's |W| * sum|g| is: a partial overlap.
    retain = {n: (0.7 * benign[n] + 0.7 * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}
    dirs = {k: str(tmp_path / k) for k in ("benign_signed", "retain")}
    for key, tree in (("benign_signed", benign), ("retain", retain)):
        if units == "candidates":
            save_candidates(dirs[key], top_candidates(unflatten(tree), 0.3), SHAPES, {"kind": key})
        else:
            save_scores(dirs[key], unflatten(tree), {"kind": key}, safetensors=False)
    for q, p in [(0.1, 0.05), (0.05, 0.3), (0.3, 0.1), (0.2, 0.0)]:
        mask = flatten(select_from_units(dirs, "benign_signed", q, p, "matrix", None))
        ref = numpy_benign_minus_retain(benign, retain, q, p)
        for name in SHAPES:
            np.testing.assert_array_equal(np.flatnonzero(np.asarray(mask[name])), ref[name], err_msg=f"{q} {p} {name}")
        if p:  # the difference removed something: T_p really is subtracted
            assert sum(len(v) for v in ref.values()) < sum(math.floor(q * np.prod(s)) for s in SHAPES.values())


def cost_curve(scale=1.0):
    """A monotone benign cost of q, recording every call."""
    calls = []

    def cost(q):
        calls.append(q)
        return scale * (q / 1e-5) ** 1.5 * 0.1

    return cost, calls


def test_search_matches_the_target_from_below_and_above():
    for target in (0.6, 0.02, 0.3):  # above the start (doubling), below it (halving), near it
        cost, calls = cost_curve()
        points, q = match_benign_cost(cost, target, 1e-5, 1e-4, steps=3)
        assert cost_matched(points[q], target), (target, q, points)
        assert len(calls) == len(set(calls)) == len(points) <= 1 + 4 + 3  # no q evaluated twice
        # The same path again: a resumed stage finds every unit it needs.
        again, q2 = match_benign_cost(cost_curve()[0], target, 1e-5, 1e-4, steps=3)
        assert (again, q2) == (points, q)


def test_search_out_of_reach_returns_the_nearest_and_stays_in_bounds():
    cost, calls = cost_curve()
    points, q = match_benign_cost(cost, 1e6, 1e-5, 1e-4, steps=3)
    assert q == 1e-4 and max(points) == 1e-4 and not cost_matched(points[q], 1e6)
    cost, calls = cost_curve()
    points, q = match_benign_cost(cost, 1e-9, 1e-5, 1e-4, steps=1)  # one halving allowed
    assert sorted(points) == [5e-6, 1e-5] and q == 5e-6 and not cost_matched(points[q], 1e-9)


def row(d_harm, d_benign, **kw):
    return {"name": kw.pop("name", "m"), "q": kw.pop("q", 1e-5), "pruned": kw.pop("pruned", 100), "d_harm": d_harm,
            "d_benign": d_benign, "per_unit": per_unit(d_harm, d_benign), **kw}


def test_distinct_verdict_follows_its_rule_both_ways():
    harm = row(0.60, 0.20)  # 3.0 per unit of benign rise
    # A baseline at the same benign cost that barely touches harmful text: distinct.
    c = claim2_baselines(harm, row(12.0, 12.3), row(0.1, 0.1, jaccard_category=0.01), row(0.20, 0.21), 0.05)
    assert c["cost_matched"] and c["distinct_supported"] is True
    # One that hurts harmful text 1.9 per unit: the harm mask's 3.0 is under 2x that, not distinct.
    c = claim2_baselines(harm, None, None, row(0.40, 0.21), 0.05)
    assert c["cost_matched"] and c["distinct_supported"] is False
    # Exactly at the rule's edge: harm per unit == SELECTIVE_RATIO x the baseline's.
    exact = row(0.75, 0.25)  # binary fractions, so the products are exact
    edge = row(0.25 * 3.0 / SELECTIVE_RATIO, 0.25)
    assert claim2_baselines(exact, None, None, edge, None)["distinct_supported"] is True
    above = row(0.25 * 3.0 / SELECTIVE_RATIO + 0.001, 0.25)
    assert claim2_baselines(exact, None, None, above, None)["distinct_supported"] is False
    # Benign cost outside the tolerance: not tested, whatever the harmful rises.
    off = row(0.0, 0.2 * (1 + MATCH_TOLERANCE) + 0.01)
    c = claim2_baselines(harm, None, None, off, None)
    assert not c["cost_matched"] and c["distinct_supported"] is None
    # A harm mask below the noise floor is never distinct, even against a harmless baseline.
    weak = row(MIN_HARM_RISE / 2, 0.0)
    assert claim2_baselines(weak, None, None, row(0.0, 0.0), None)["distinct_supported"] is False
    assert claim2_baselines(harm, None, None, None, None)["distinct_supported"] is None
    assert "per unit" in c["baseline_rule"] and f"{MATCH_TOLERANCE:.0%}" in c["baseline_rule"]


def test_overlap_against_the_baseline_follows_its_rule_both_ways():
    same = row(0.1, 0.1, jaccard_category=0.02)
    assert claim2_baselines(None, None, same, None, OVERLAP_RATIO * 0.02)["overlap_vs_baseline_supported"] is True
    assert claim2_baselines(None, None, same, None, OVERLAP_RATIO * 0.02 - 1e-6)["overlap_vs_baseline_supported"] is False
    zero = row(0.1, 0.1, jaccard_category=0.0)
    assert claim2_baselines(None, None, zero, None, 0.0)["overlap_vs_baseline_supported"] is False
    assert claim2_baselines(None, None, row(0.1, 0.1, jaccard_category=None), None, 0.3)[
        "overlap_vs_baseline_supported"] is None


def test_per_unit_and_match_band():
    assert per_unit(0.6, 0.2) == pytest.approx(3.0)
    assert per_unit(0.6, 0.0) == pytest.approx(0.6 / MIN_HARM_RISE)  # benign noise floor, no division by 0
    assert per_unit(None, 0.2) is None and per_unit(float("nan"), 0.2) is None
    assert cost_matched(0.2 * (1 + MATCH_TOLERANCE), 0.2) and not cost_matched(0.2 * (1 + MATCH_TOLERANCE) + 1e-6, 0.2)
    assert cost_matched(0.01, 0.0) and not cost_matched(None, 0.2) and not cost_matched(float("nan"), 0.2)


def test_baseline_rows_mark_roles_and_the_benign_share_inside_t_p():
    masks = [{"name": "benign", "kind": "benign", "q": 1e-5, "p": 0.0, "total": 960, "fraction": 1e-5,
              "fraction_params": 7e-6}]
    base = {"harm_nll": 1.0, "benign_nll": 1.0}
    bl = {"same_q": "b1", "matched": "b2", "masks": [
        {"name": n, "kind": "benign_minus_retain", "q": q, "p": 5e-5, "total": t, "fraction": 0.0,
         "fraction_params": 0.0, "jaccard_category": j} for n, q, t, j in (("b2", 2e-5, 857, 0.03), ("b1", 1e-5, 198, 0.02))]}
    results = {"unpruned": base, "benign": {"harm_nll": 13.0, "benign_nll": 13.5},
               "b1": {"harm_nll": 1.1, "benign_nll": 1.05}, "b2": {"harm_nll": 1.3, "benign_nll": 1.25}}
    rows = baseline_rows(masks, results, bl, 0.014)
    assert [r["role"] for r in rows] == ["benign-data mask", "same q", "matched"]
    assert rows[0]["d_harm"] == pytest.approx(12.0) and rows[0]["jaccard_category"] == 0.014
    c = claim2_baselines(row(0.5, 0.24), rows[0], rows[1], rows[2], 0.047)
    assert c["benign_mask_in_retain"] == pytest.approx(1 - 198 / 960)
    assert c["overlap_vs_baseline_supported"] is True  # 0.047 >= 2 x 0.02
    # 0.5 / 0.24 = 2.08 per unit against 0.3 / 0.25 = 1.2: under 2x, matched within 25%.
    assert c["cost_matched"] and c["distinct_supported"] is False
