"""Bootstrap intervals over prompts (`harmjax.evaluate.bootstrap`) and the verdicts built on them
(`harmjax.experiments.main.intervals`): seeded reproducibility, coverage of a known mean,
stratified and paired resampling, and a verdict that turns "inconclusive" when its interval
straddles the rule's threshold."""

import numpy as np
import pytest

from harmjax.evaluate.bootstrap import (
    clears, finite_means, interval, ratio, resample_indices, resample_sets, verdict,
)
from harmjax.experiments.main.intervals import Resampled, claim1_intervals
from harmjax.experiments.main.verdicts import claim1, mask_row


def test_seeded_reproducible_and_seed_dependent():
    sets = {"harmful": ["a", "b", "a", "b", "c"], "benign": 7}
    one, two, other = resample_sets(sets, 50, seed=3), resample_sets(sets, 50, seed=3), resample_sets(sets, 50, seed=4)
    for k in sets:
        np.testing.assert_array_equal(one[k], two[k])
    assert any(not np.array_equal(one[k], other[k]) for k in sets)
    # Independent sets: the benign draws are not the harmful ones.
    assert one["benign"].shape == (50, 7) and one["harmful"].shape == (50, 5)


def test_stratified_keeps_each_group_in_place():
    groups = ["x", "y", "x", "z", "y", "x"]
    idx = resample_indices(6, 200, np.random.default_rng(0), groups=groups)
    g = np.array(groups)
    assert (g[idx] == g[None, :]).all()  # every column draws from its own group
    assert len(np.unique(idx[:, 0])) == 3  # from all of group x


def test_interval_covers_a_known_mean_at_its_nominal_rate():
    # 300 data sets of n=60 draws of N(0, 1): the percentile interval of the mean covers 0 about
    # 95% of the time and is about 2 * 1.96 / sqrt(n) wide.
    rng, n, hits, widths = np.random.default_rng(11), 60, 0, []
    for _ in range(300):
        x = rng.normal(size=n)
        low, high = interval(finite_means(x, rng.integers(0, n, (1000, n))))
        hits += low <= 0.0 <= high
        widths.append(high - low)
    assert 0.89 <= hits / 300 <= 0.99
    assert np.mean(widths) == pytest.approx(2 * 1.959964 / np.sqrt(n), rel=0.08)


def test_finite_means_and_pairing():
    values = np.array([1.0, np.inf, 3.0, np.nan])
    idx = np.array([[0, 1, 2, 3], [1, 1, 3, 3], [2, 2, 0, 1]])
    np.testing.assert_allclose(finite_means(values, idx), [2.0, np.nan, 7.0 / 3.0])
    # Paired: a model that adds 0.5 to every answer gives a zero-width interval of the difference.
    rng = np.random.default_rng(0)
    base = rng.normal(size=40)
    idx = rng.integers(0, 40, (500, 40))
    d = finite_means(base + 0.5, idx) - finite_means(base, idx)
    assert interval(d) == pytest.approx((0.5, 0.5))


def test_ratio_interval_decides_like_the_difference():
    rng = np.random.default_rng(2)
    num, den = rng.normal(1.0, 0.5, 999), rng.normal(0.3, 0.3, 999)
    r = ratio(num, den)
    assert np.isinf(r[den <= 0]).all()
    for t in (1.0, 2.0, 3.0):
        assert clears(interval(r), t) == clears(interval(num - t * np.maximum(den, 0.0)), 0.0)
    assert verdict(True, True) == "shown" and verdict(True, False) == "inconclusive"
    assert verdict(False, True) == "not shown" and verdict(None, True) == "not tested"


def _claim1_table(spread: float, seed: int = 0):
    """Per-answer NLLs of an unpruned model, a harm mask and its random control; the mask adds
    0.3 nats on average to harmful answers (with `spread`) and nothing to benign ones."""
    rng = np.random.default_rng(seed)
    n, m = 12, 10
    base_h, base_b = rng.uniform(1, 2, n), rng.uniform(1, 2, m)
    harm = base_h + 0.3 + spread * rng.normal(size=n)
    harm -= harm.mean() - base_h.mean() - 0.3
    nll = {"unpruned": {"harm": base_h, "benign": base_b}, "harm_q1": {"harm": harm, "benign": base_b + 0.01},
           "random_q1": {"harm": base_h, "benign": base_b}}
    table = {"harm_categories": ["a", "b"] * (n // 2), "benign_ids": list(range(m)),
             "nll": {k: {s: list(v) for s, v in d.items()} for k, d in nll.items()}}
    results = {k: {"harm_nll": float(np.mean(d["harm"])), "benign_nll": float(np.mean(d["benign"]))}
               for k, d in nll.items()}
    return table, results


@pytest.mark.parametrize("spread, expected", [(0.05, "shown"), (1.5, "inconclusive")])
def test_claim1_verdict_needs_its_interval_to_clear(spread, expected):
    table, results = _claim1_table(spread)
    entry = {"q": 1e-5, "p": 1e-5, "total": 10, "fraction": 1e-6, "fraction_params": 1e-6}
    sweep = [mask_row({**entry, "name": "harm_q1"}, results["harm_q1"], results["unpruned"])]
    random = [mask_row({**entry, "name": "random_q1"}, results["random_q1"], results["unpruned"])]
    c1 = claim1(sweep, random)
    assert c1["supported"]  # the point estimates meet the rule either way
    out = claim1_intervals(c1, sweep, random, Resampled(table, 1000, seed=0))
    assert out["verdict"] == expected and out["supported"] == (expected == "shown") and out["point_supported"]
    low, high = sweep[0]["ci"]["d_harm"]
    assert low <= sweep[0]["d_harm"] <= high
    assert (low >= 0.05) == (expected == "shown")
