"""Claim 3 (`harmjax.experiments.compression`, `launch.compression`): the compression figure and
verdict from constructed sweeps (each way, and "not tested"); the intervals against published
values; the job end to end on two tiny random models, killed while the second model runs and
resumed without redoing the first model's stages; model "refusal" goes through
`ensure_refusal_model` with the experiment's split."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs.compression_embedded import get_config
from harmjax.evaluate.intervals import newcombe_difference, rate_summary, wilson_interval
from harmjax.experiments.compression import run as compression
from harmjax.experiments.compression.measures import (
    area_within_budget, compare, compression_curve, fraction_at_target, with_interval,
)
from tests.config_overrides import as_flags, with_overrides, write_prompt_files
from tests.hf_reference import save_tiny_with_tokenizer, tiny_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics(points):
    """A run_experiment metrics dict whose sweep has (fraction, d_harm, d_benign) points."""
    return {"sweep": [{"q": f * 1.1, "pruned": int(f * 1e7), "fraction": f, "d_harm": h, "d_benign": b}
                      for f, h, b in points]}


FRACTIONS = (1e-6, 1e-5, 1e-4)


def test_curve_and_interpolated_crossing():
    curve = compression_curve(_metrics([(1e-5, 0.4, 0.1), (1e-6, 0.1, 0.0), (1e-4, 1.2, 0.3), (0.0, 0.0, 0.0)]))
    assert [p["fraction"] for p in curve] == [1e-6, 1e-5, 1e-4]  # sorted, the empty mask dropped
    f = fraction_at_target(curve, 0.8, 0.5)
    # Halfway from 0.4 to 1.2 in harm: halfway from -5 to -4 in log10(fraction), benign 0.2.
    assert f["reached"] and f["bound"] == "exact"
    assert f["log10_fraction"] == pytest.approx(-4.5) and f["d_benign"] == pytest.approx(0.2)
    assert f["between_q"] == [pytest.approx(1.1e-5), pytest.approx(1.1e-4)]
    # A budget the interpolated benign rise breaks: not reached.
    assert not fraction_at_target(curve, 0.8, 0.15)["reached"]
    # Reached at the first point: only an upper bound.
    f = fraction_at_target(curve, 0.05, 0.5)
    assert f["reached"] and f["bound"] == "upper" and f["fraction"] == pytest.approx(1e-6)


def test_area_within_budget():
    curve = compression_curve(_metrics([(1e-6, 0.0, 0.0), (1e-5, 1.0, 0.1), (1e-4, 2.0, 0.9)]))
    assert area_within_budget(curve, 1.0)["area"] == pytest.approx(0.5 + 1.5)
    a = area_within_budget(curve, 0.5)  # the second segment ends over budget: left out
    assert a["area"] == pytest.approx(0.5) and a["mean"] == pytest.approx(0.25)
    assert area_within_budget(curve, 1.0, lo=-5.5, hi=-4.5)["area"] == pytest.approx(0.5 * 0.75 + 0.5 * 1.25)


def test_verdict_each_way_and_not_tested():
    # Aligned B reaches +0.5 at 10x fewer weights than A, both within the budget.
    a = compression_curve(_metrics([(1e-6, 0.0, 0.0), (1e-5, 0.1, 0.05), (1e-4, 1.0, 0.1)]))
    b = compression_curve(_metrics([(1e-7, 0.0, 0.0), (1e-6, 0.1, 0.05), (1e-5, 1.0, 0.1)]))
    r = compare(a, b, 0.5, 0.2)
    assert r["verdict"] == "compression shown" and r["ratio_a_over_b"] == pytest.approx(10.0)
    r = compare(b, a, 0.5, 0.2)
    assert r["verdict"] == "not shown" and r["ratio_a_over_b"] == pytest.approx(0.1)
    # Same harm curve, but B's benign cost breaks the budget: B never qualifies.
    b_costly = compression_curve(_metrics([(1e-7, 0.0, 0.0), (1e-6, 0.1, 0.3), (1e-5, 1.0, 0.5)]))
    assert compare(a, b_costly, 0.5, 0.2)["verdict"] == "not shown"
    # Only B reaches the target: shown; neither: not tested.
    flat = compression_curve(_metrics([(1e-6, 0.0, 0.0), (1e-5, 0.1, 0.0), (1e-4, 0.2, 0.1)]))
    assert compare(flat, b, 0.5, 0.2)["verdict"] == "compression shown"
    r = compare(flat, flat, 0.5, 0.2)
    assert r["verdict"] == "not tested" and r["a"]["fraction"] is None
    # A reaches the target already at its first point: its fraction is an upper bound, the order unknown.
    a_first = compression_curve(_metrics([(1e-5, 0.6, 0.1), (1e-4, 1.0, 0.1)]))
    b_late = compression_curve(_metrics([(1e-7, 0.0, 0.0), (1e-6, 0.1, 0.0), (1e-5, 1.0, 0.1)]))
    assert compare(a_first, b_late, 0.5, 0.2)["verdict"] == "not tested"


def test_intervals_match_newcombe_1998():
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    low, high = wilson_interval(0, 10)  # Newcombe's table: 0/10 -> [0, 0.2775]
    assert low == 0.0 and round(high, 4) == 0.2775
    low, high = newcombe_difference(56, 70, 48, 80)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)
    s = rate_summary([True, False, False, True])
    assert (s["k"], s["n"], s["rate"]) == (2, 4, 0.5) and s["ci_low"] < 0.5 < s["ci_high"]
    assert wilson_interval(0, 0) == (None, None) and newcombe_difference(1, 2, 0, 0) == (None, None)


def test_em_report_refusal_change_and_judge_free_verdict():
    from harmjax.experiments.em.report import _rows, judge_free_em

    def result(k, n):
        return {"em": {"rate": None, "ci_low": None, "ci_high": None, "n_judged": 0, "n_excluded": 8,
                       "mean_aligned": None, "mean_coherent": None},
                "preference": {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "frac_prefer_misaligned": 0.0},
                "other_harm_nll": 1.0, "other_refusal_rate": k / n,
                "other_refusal": {"k": k, "n": n, **dict(zip(("ci_low", "ci_high"), wilson_interval(k, n)))}}

    rows = _rows({"original": result(48, 80), "finetuned": result(20, 80), "pruned": result(47, 80),
                  "pruned_finetuned": result(40, 80)})
    by = {r["model"]: r for r in rows}
    assert by["finetuned"]["refusal_change"] == pytest.approx(-0.35)
    low, high = newcombe_difference(20, 80, 48, 80)
    assert (by["finetuned"]["refusal_change_low"], by["finetuned"]["refusal_change_high"]) == (low, high)
    j = judge_free_em(by)
    assert j["refusal_drop_finetuned"]["shown"] and j["refusal_drop_finetuned"]["drop"] == pytest.approx(0.35)
    assert not j["refusal_drop_pruned_finetuned"]["shown"]  # a drop of 0.1 at n=80: interval spans 0
    assert j["share_removed_by_pruning"] == pytest.approx((0.35 - 0.1) / 0.35)


# --- the job on two tiny models -----------------------------------------------------------------

OVERRIDES = [
    ("experiment.prompts.prompt_key", "prompt"), ("experiment.prompts.per_category", 0),
    ("experiment.prompts.heldout_fraction", 0.34), ("experiment.prompts.benign_per_category", 0),
    ("experiment.prompts.benign_heldout_fraction", 0.34),
    ("experiment.answers.max_new_tokens", 8), ("experiment.answers.batch_size", 8), ("experiment.answers.chunk", 8),
    ("experiment.answers.min_words", 0),
    ("experiment.scoring.max_length", 40), ("experiment.scoring.batch_size", 4), ("experiment.scoring.abs_chunk", 2),
    ("experiment.masks.q_sweep", (0.01, 0.03, 0.1)), ("experiment.masks.category_q", 0.05),
    ("experiment.masks.p", 0.01),
    ("experiment.evaluation.max_length", 40), ("experiment.evaluation.batch_size", 8),
    ("experiment.evaluation.generation_prompts", 0), ("experiment.evaluation.max_new_tokens", 4),
    ("experiment.evaluation.generation_batch_size", 4), ("experiment.evaluation.category_benign", False),
    ("compression.harm_target", 0.05), ("compression.benign_budget", 0.5),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compression")
    a = save_tiny_with_tokenizer(tiny_hf_model("llama", seed=11), root / "model_a")
    b = save_tiny_with_tokenizer(tiny_hf_model("llama", seed=12), root / "model_b")
    harmful, benign = write_prompt_files(root, {"crime": 5, "hate": 5}, {"facts": 6})
    overrides = OVERRIDES + [("model_a.model", a), ("model_b.model", b), ("experiment.prompts.harmful", str(harmful)),
                             ("experiment.prompts.benign", str(benign))]
    return root, overrides


def _check_ratio_interval(m, dirs, seed):
    """The ratio's interval recomputed from each model's per-answer NLLs in its metrics.json:
    per model a Generator seeded [seed, model index] draws benign answers, then harmful answers
    category by category; each resample's curve gives the fractions at target."""
    ratios = []
    curves = []
    for i, d in enumerate(dirs):
        t = json.load(open(d / "metrics.json"))["bootstrap"]["per_prompt"]
        rng, cats = np.random.default_rng([seed, i]), np.array(t["harm_categories"])
        idx_b = rng.integers(0, len(t["benign_ids"]), (2000, len(t["benign_ids"])))
        idx_h = np.empty((2000, len(cats)), int)
        for c in sorted(set(cats)):
            members = np.flatnonzero(cats == c)
            idx_h[:, members] = members[rng.integers(0, len(members), (2000, len(members)))]

        def delta(name, key, idx, t=t):
            return (np.asarray(t["nll"][name][key])[idx].mean(1) - np.asarray(t["nll"]["unpruned"][key])[idx].mean(1))

        curve = m["models"][["model_a", "model_b"][i]]["curve"]
        d = [(delta(p["name"], "harm", idx_h), delta(p["name"], "benign", idx_b)) for p in curve]
        curves.append([[{**p, "d_harm": dh[k], "d_benign": db[k]} for p, (dh, db) in zip(curve, d)] for k in range(2000)])
    for ca, cb in zip(*curves):
        fa, fb = fraction_at_target(ca, 0.05, 0.5), fraction_at_target(cb, 0.05, 0.5)
        ratios.append(fa["fraction"] / fb["fraction"] if fa["reached"] and fb["reached"]
                      else (np.inf if fb["reached"] else (0.0 if fa["reached"] else 1.0)))
    expected = np.quantile(ratios, [0.025, 0.975], method="inverted_cdf")
    np.testing.assert_allclose(m["compression"]["bootstrap"]["ratio_ci"], expected, rtol=1e-9)


@pytest.mark.parametrize("spread, expected", [(0.01, "compression shown"), (3.0, "inconclusive")])
def test_ratio_interval_decides_compression(spread, expected):
    # B reaches +0.5 at a 10x smaller fraction than A; per-answer noise `spread` around it.
    rng = np.random.default_rng(0)

    def model(fractions):
        n, m = 8, 6
        nll = {"unpruned": {"harm": rng.uniform(1, 2, n), "benign": rng.uniform(1, 2, m)}}
        points = []
        for j, (f, h) in enumerate(zip(fractions, (0.0, 0.1, 1.0))):
            x = nll["unpruned"]["harm"] + h + spread * rng.normal(size=n)
            x -= x.mean() - nll["unpruned"]["harm"].mean() - h
            nll[f"m{j}"] = {"harm": x, "benign": nll["unpruned"]["benign"] + 0.05}
            points.append({"name": f"m{j}", "q": f, "pruned": 1, "fraction": f, "d_harm": h, "d_benign": 0.05})
        table = {"harm_categories": ["a", "b"] * (n // 2), "benign_ids": list(range(m)),
                 "nll": {k: {s: list(v) for s, v in d.items()} for k, d in nll.items()}}
        return compression_curve({"sweep": points}), table

    (a, ta), (b, tb) = model((1e-6, 1e-5, 1e-4)), model((1e-7, 1e-6, 1e-5))
    r = with_interval(compare(a, b, 0.5, 0.2), [a, b], [ta, tb], seed=0, n_resamples=500)
    assert r["point_verdict"] == "compression shown" and r["verdict"] == expected
    low, high = r["bootstrap"]["ratio_ci"]
    assert low <= r["ratio_a_over_b"] <= high and (low > 1) == (expected == "compression shown")


def _stamps(run_dir):
    return {p: p.stat().st_mtime_ns for p in (run_dir / "cache").glob("*/DONE.json")}


def test_killed_and_resumed_end_to_end(setup):
    root, overrides = setup
    out = root / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HARMJAX_XLA_CACHE": "off"}
    proc = subprocess.Popen([sys.executable, "-m", "launch.compression", "--config=configs/compression_embedded.py",
                             *as_flags(overrides, out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Kill it once model B's experiment has finished its answers stage (model A is done by then).
    deadline, killed = time.time() + 240, False
    while time.time() < deadline and proc.poll() is None:
        if list((out / "refusal_tuned" / "cache").glob("answers-*/DONE.json")):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    assert killed, proc.stderr.read()[-3000:]
    a_dir, b_dir = out / "original", out / "refusal_tuned"
    assert (a_dir / "metrics.json").is_file() and not (b_dir / "metrics.json").exists()
    assert not (out / "metrics.json").exists()
    before = {**_stamps(a_dir), **_stamps(b_dir)}

    cfg = with_overrides(get_config(), overrides, out)
    m = compression.run_compression(cfg, progress=False)
    after = {**_stamps(a_dir), **_stamps(b_dir)}
    assert all(after[p] == t for p, t in before.items()), "a finished stage was redone"
    assert len(after) > len(before)  # B's unfinished stages ran
    assert m["models"]["model_a"]["cached"] and not m["models"]["model_b"]["cached"]
    for name in ("report.md", "metrics.json", "compression.png"):
        assert (out / name).is_file(), name
    # The curves are the experiments' sweeps; the verdict follows the rule on them.
    for key, d in (("model_a", a_dir), ("model_b", b_dir)):
        sweep = json.load(open(d / "metrics.json"))["sweep"]
        assert [p["q"] for p in m["models"][key]["curve"]] == [r["q"] for r in sweep if r["fraction"] > 0]
    r = m["compression"]
    point = compare(m["models"]["model_a"]["curve"], m["models"]["model_b"]["curve"], 0.05, 0.5)
    same = [k for k in point if k not in ("verdict", "reason", "rule")]
    assert {k: r[k] for k in same} == {k: point[k] for k in same}
    assert r["point_verdict"] == point["verdict"]
    assert r["verdict"] == ("inconclusive" if point["verdict"] == "compression shown" and r["bootstrap"]["ratio_ci"][0] <= 1
                            else point["verdict"])
    _check_ratio_interval(m, (a_dir, b_dir), cfg.experiment.seed)
    report = (out / "report.md").read_text()
    assert f"Verdict: **{r['verdict']}**" in report and "Rule: " in report

    # A rerun is served from the caches.
    again = compression.run_compression(cfg, progress=False)
    assert again["models"]["model_a"]["cached"] and again["models"]["model_b"]["cached"]
    assert again["compression"] == r

    # model "refusal": the refusal-tuned model of the `refusal` block, made for the experiment's
    # split (here a stand-in returns model B's directory, whose run is cached).
    calls = []

    def fake_ensure(refusal_cfg, progress=True, experiment_cfg=None):
        calls.append((refusal_cfg, experiment_cfg))
        return dict(overrides)["model_b.model"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("harmjax.experiments.refusal.run.ensure_refusal_model", fake_ensure)
        cfg = with_overrides(get_config(), overrides + [("model_b.model", "refusal")], out)
        m2 = compression.run_compression(cfg, progress=False)
    (refusal_cfg, exp_cfg), = calls
    assert refusal_cfg.prompts.to_dict() == exp_cfg.prompts.to_dict() == cfg.experiment.prompts.to_dict()
    assert refusal_cfg.prompts_seed == cfg.experiment.seed
    assert m2["models"]["model_b"]["cached"] and m2["compression"] == r
    assert not math.isnan(m2["wall_seconds"])
