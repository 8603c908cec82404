"""The end-to-end experiment (`launch.run` / `harmjax.experiments.run_experiment`) on a tiny random
model: every stage runs, the report's files and numbers agree with each other and with the
stage outputs, a rerun is served from the cache, and a run killed mid-stage resumes without
redoing finished stages or units."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs.embedded import get_config
from harmjax.masks import load_mask
from harmjax.experiments import run_experiment
from harmjax.experiments.core.stages import slug
from harmjax.tree import flatten
from tests.config_overrides import as_flags, assert_same_results, with_overrides, write_prompt_files
from tests.hf_reference import save_tiny_with_tokenizer, tiny_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = ("crime", "hate", "weapons")

# The settings the tests override, as (dotted key, value): used in-process and as absl flags.
OVERRIDES = [
    ("prompts.prompt_key", "prompt"), ("prompts.per_category", 0), ("prompts.heldout_fraction", 0.34),
    ("prompts.benign_per_category", 0), ("prompts.benign_heldout_fraction", 0.34),
    ("answers.max_new_tokens", 10), ("answers.batch_size", 8), ("answers.chunk", 8), ("answers.min_words", 0),
    ("scoring.max_length", 48), ("scoring.batch_size", 4), ("scoring.abs_chunk", 2), ("scoring.checkpoint_every", 1),
    ("masks.q_sweep", (0.01, 0.1)), ("masks.category_q", 0.05), ("masks.p", 0.01),
    ("evaluation.max_length", 48), ("evaluation.batch_size", 8), ("evaluation.generation_prompts", 3),
    ("evaluation.max_new_tokens", 6), ("evaluation.generation_batch_size", 4),
    ("over_refusal.safe_per_kind", 1), ("over_refusal.max_new_tokens", 4), ("over_refusal.batch_size", 16),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    model_dir = save_tiny_with_tokenizer(tiny_hf_model("llama", seed=5), root / "model")
    harmful, benign = write_prompt_files(root, {c: 6 for c in CATEGORIES}, {"facts": 6, "code": 6})
    overrides = OVERRIDES + [("model", model_dir), ("prompts.harmful", str(harmful)), ("prompts.benign", str(benign))]
    return root, overrides


def _config(overrides, output_dir):
    return with_overrides(get_config(), overrides, output_dir)


@pytest.fixture(scope="module")
def uninterrupted(setup):
    """(run dir, metrics) of one uninterrupted run of the test settings, run here once per
    module (per xdist worker), so every test that compares with it always has it."""
    root, overrides = setup
    out = root / "run"
    return out, run_experiment(_config(overrides, out), progress=False)


# The metrics of a run that depend on its results (not on where it ran or how long it took).
RESULT_KEYS = ("data", "baseline", "sweep", "random_control", "transfer", "overlap", "category_masks",
               "benign_baselines", "claims")


def test_every_stage_and_a_consistent_report(setup, uninterrupted):
    _, overrides = setup
    out, m = uninterrupted

    for name in ("report.md", "metrics.json", "prompts.json", "harm_vs_utility.png", "mask_layers.png",
                 "overlap.png", "transfer.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(out / "metrics.json"))["claims"] == json.loads(json.dumps(m["claims"]))

    # Counts: 18 harmful prompts, 2 of 6 held out per category; 12 benign, 2 of 6 held out.
    d = m["data"]
    assert (d["harmful_prompts"], d["pruning_prompts"], d["heldout_prompts"]) == (18, 12, 6)
    assert d["pruning_examples"] + d["heldout_examples"] + d["harmful_refused_dropped"] == 18
    assert (d["retain_examples"], d["benign_heldout_examples"]) == (8, 4)
    assert d["generation_prompts"] == 3 and sorted(d["categories"]) == list(CATEGORIES)
    prompts = json.load(open(out / "prompts.json"))
    assert not set(prompts["pruning"]) & set(prompts["heldout"])

    # Masks: the counts the report gives are the masks on disk, and q sets the size.
    sweep, random = m["sweep"], m["random_control"]
    assert [r["q"] for r in sweep] == [r["q"] for r in random] == [0.01, 0.1]
    mask_dirs = {e["name"]: e["dir"] for e in m["category_masks"]}
    for row, ctrl in zip(sweep, random):
        assert row["pruned"] == ctrl["pruned"] > 0
    assert sweep[0]["pruned"] < sweep[1]["pruned"]
    scored = sum(int(np.prod(w.shape)) for w in jax.tree.leaves(load_mask(mask_dirs["benign"])[0]))
    assert sweep[0]["fraction"] == pytest.approx(sweep[0]["pruned"] / scored)
    # Per matrix, T_q takes floor(q * size) and T_p spares at most floor(p * size).
    assert sweep[1]["pruned"] <= 0.1 * scored and sweep[1]["pruned"] >= (0.1 - 0.01) * scored - 21
    # Random control: same count in every matrix, different positions.
    run_masks = [p for p in (out / "cache").glob("masks-*")][0]
    harm, _ = load_mask(str(run_masks / "harm_q0.01"))
    rnd, _ = load_mask(str(run_masks / "random_q0.01"))

    for a, b in zip(jax.tree.leaves(harm), jax.tree.leaves(rnd)):
        assert int(np.sum(a)) == int(np.sum(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(harm), jax.tree.leaves(rnd)))

    # Metrics: deltas are differences of the reported NLLs; every mask was evaluated.
    base = m["baseline"]
    for row in sweep + random:
        assert row["d_harm"] == pytest.approx(row["harm_nll"] - base["harm_nll"])
        assert row["d_benign"] == pytest.approx(row["benign_nll"] - base["benign_nll"])
    assert all(row["refusal_rate"] is not None for row in sweep)  # generations with the harm masks
    assert all(row["refusal_rate"] is None for row in random)  # (the random ones are off by default)
    assert np.isfinite(base["harm_nll"]) and np.isfinite(base["benign_nll"])
    assert set(base["harm_nll_per_category"]) == set(CATEGORIES)

    # Overlap: categories then benign, symmetric, 1 on the diagonal, Jaccard in [0, 1].
    ov = m["overlap"]
    assert ov["labels"] == [*CATEGORIES, "benign"]
    mat = np.array(ov["matrix"], dtype=float)
    np.testing.assert_allclose(mat, mat.T)
    np.testing.assert_allclose(np.diag(mat), 1.0)
    assert set(mask_dirs) == {*CATEGORIES, "benign"}
    _check_against_stage_files(m, out)
    # Transfer: 3 x 3 rises of per-category harmful NLL.
    t = m["transfer"]
    assert t["rows"] == list(CATEGORIES) == t["cols"] and np.array(t["delta_harm_nll"]).shape == (3, 3)
    for key in ("1", "2"):
        assert "rule" in m["claims"][key]
    report = open(out / "report.md").read()
    for heading in ("Claim 1", "Claim 2", "Random control", "Sample generations", "can and cannot show"):
        assert heading in report

    _check_benign_baselines(m, out, report)
    _check_intervals(m, out, report)
    _check_over_refusal(m, out, report)

    # A run directory from before the per-answer NLLs were kept (units without "per_prompt"):
    # a rerun measures them again (NLLs only) and reports the same intervals, every stage cached.
    for unit in (out / "cache").glob("*/*.json"):
        metrics = json.load(open(unit))
        if isinstance(metrics, dict) and metrics.pop("per_prompt", None) is not None:
            json.dump(metrics, open(unit, "w"))
    # A rerun is served from the cache: every stage cached, same numbers.
    again = run_experiment(_config(overrides, out), progress=False)
    assert all(v.get("cached") for k, v in again["timings"].items() if k != "load")
    assert again["sweep"] == m["sweep"]
    assert_same_results(m["claims"], again["claims"], rel=1e-5, abs_tol=1e-6, where="claims")
    assert "per_prompt" in json.load(open(next((out / "cache").glob("evaluation-*")) / "unpruned.json"))
    # ... and each cached stage still reports the time it took when it ran.
    for k, v in again["timings"].items():
        if k != "load":
            assert v["seconds"] == 0.0 and v["computed_seconds"] == m["timings"][k]["seconds"], k
    assert "computed in" in open(out / "report.md").read()
    # Without the baselines (a config from before them): the same cached stages and numbers, no baseline rows.
    without = run_experiment(_config(overrides + [("baselines.enabled", False)], out), progress=False)
    assert "baselines" not in without["timings"]
    assert all(v.get("cached") for k, v in without["timings"].items() if k != "load")
    assert without["sweep"] == m["sweep"] and without["overlap"] == m["overlap"]
    assert [r["role"] for r in without["benign_baselines"]["rows"]] == ["benign-data mask"]
    keys = ("overlap_supported", "transfer_supported", "transfer_verdict", "transfer_ci")
    assert {k: without["claims"]["2"][k] for k in keys} == {k: m["claims"]["2"][k] for k in keys}
    assert without["claims"]["2"]["distinct_supported"] is None


def _check_against_stage_files(m, out):
    """The report's counts, refusal rates and overlaps recomputed from the stage files on disk:
    example counts from the stored answers and prompts.json, pruned counts from the masks'
    indices, refusal rates by the keyword judge over the stored generations, Jaccard overlaps
    as Python set operations on the masks' (matrix, index) pairs."""
    from harmjax.evaluate.refusal import is_refusal
    from harmjax.masks import load_mask_indices

    cache = out / "cache"
    prompts = json.load(open(out / "prompts.json"))
    answers = next(cache.glob("answers-*"))
    rows_h, rows_b = ({r["id"]: r for r in (json.loads(x) for x in open(answers / f) if x.strip())}
                      for f in ("harmful.jsonl", "benign.jsonl"))

    def usable(rows, ids, drop_refused=True):
        return sum(bool(rows[i]["response"].strip()) and not (drop_refused and rows[i]["refused"]) for i in ids)

    d = m["data"]
    assert d["pruning_examples"] == usable(rows_h, prompts["pruning"])
    assert d["heldout_examples"] == usable(rows_h, prompts["heldout"])
    assert d["harmful_refused_dropped"] == sum(r["refused"] for r in rows_h.values())
    assert d["retain_examples"] == usable(rows_b, prompts["retain"], drop_refused=False)
    assert d["benign_heldout_examples"] == usable(rows_b, prompts["benign_heldout"], drop_refused=False)

    masks, evaluation = next(cache.glob("masks-*")), next(cache.glob("evaluation-*"))
    min_words = get_config().evaluation.refusal_min_words
    for kind, rows in (("harm", m["sweep"]), ("random", m["random_control"])):
        for row in rows:
            indices, _ = load_mask_indices(str(masks / f"{kind}_q{row['q']:g}"))
            assert row["pruned"] == sum(len(v) for v in indices.values()), row["name"]
    for name, row in [("unpruned", m["baseline"])] + [(f"harm_q{r['q']:g}", r) for r in m["sweep"]]:
        samples = json.load(open(evaluation / f"{name}.json"))["samples"]
        assert len(samples) == d["generation_prompts"] and {s["id"] for s in samples} <= set(prompts["heldout"])
        flags = [is_refusal(s["response"], min_words=min_words) for s in samples]
        assert row["refusal_rate"] == pytest.approx(np.mean(flags)), name

    dirs = {e["name"]: e["dir"] for e in m["category_masks"]}
    pairs = {}
    for label in m["overlap"]["labels"]:
        indices, _ = load_mask_indices(dirs[label])
        pairs[label] = {(n, int(i)) for n, idx in indices.items() for i in idx}
    for i, a in enumerate(m["overlap"]["labels"]):
        for j, b in enumerate(m["overlap"]["labels"]):
            union = pairs[a] | pairs[b]
            assert m["overlap"]["matrix"][i][j] == pytest.approx(len(pairs[a] & pairs[b]) / len(union)), (a, b)


def _check_benign_baselines(m, out, report):
    """Claim 2's benign baselines in a finished run: the benign-data mask's evaluation, every
    benign \\ retain mask against a NumPy top-k set difference of the stored scores, the
    generations of the two masks the verdict uses, and the verdict recomputed from the rows."""
    from harmjax.masks import load_mask_indices
    from harmjax.masks.storage import load_candidates
    from harmjax.experiments.main.report import summary_text
    from harmjax.experiments.main.verdicts import claim2_baselines

    base, rows = m["baseline"], m["benign_baselines"]["rows"]
    roles = [r["role"] for r in rows]
    assert roles[0] == "benign-data mask" and len(rows) >= 2
    assert any("same q" in r for r in roles) and any("matched" in r for r in roles)
    ev_benign = json.load(open(next((out / "cache").glob("evaluation-*")) / "benign.json"))
    assert rows[0]["d_harm"] == pytest.approx(ev_benign["harm_nll"] - base["harm_nll"])
    assert rows[0]["d_benign"] == pytest.approx(ev_benign["benign_nll"] - base["benign_nll"])
    scores = next((out / "cache").glob("scores-*"))
    cands_b, shapes, _ = load_candidates(str(scores / "benign_signed"))
    cands_r, _, _ = load_candidates(str(scores / "retain"))
    p = dict(OVERRIDES)["masks.p"]

    def top(cands, name, fraction):  # the first floor(f * |M|) by descending score, then index
        idx, values = cands[name]
        return idx[np.lexsort((idx, -values))][: int(np.floor(fraction * np.prod(shapes[name])))]

    stage = next((out / "cache").glob("baselines-*"))
    for r in rows[1:]:
        on_disk, _ = load_mask_indices(str(stage / f"benign_minus_retain_q{r['q']:g}"))
        for name in shapes:
            expected = np.setdiff1d(top(cands_b, name, r["q"]), top(cands_r, name, p))
            np.testing.assert_array_equal(on_disk[name], expected, err_msg=f"{r['q']} {name}")
        assert sum(len(v) for v in on_disk.values()) == r["pruned"] and r["p"] == p
        assert r["d_harm"] == pytest.approx(r["harm_nll"] - base["harm_nll"])
        # Generations (refusal rate) for the masks the verdict uses, NLLs only for the other searched q's.
        assert (r["refusal_rate"] is not None) == (r["role"] != "search")
    assert next(r for r in rows if "same q" in r["role"])["q"] == dict(OVERRIDES)["masks.category_q"]
    c2 = m["claims"]["2"]
    pick = {k: next(r for r in rows if k in r["role"].split(", ")) for k in ("benign-data mask", "same q", "matched")}
    harm = next(r for r in m["sweep"] if r["name"] == c2["harm_mask"]["name"])
    expected = claim2_baselines(harm, pick["benign-data mask"], pick["same q"], pick["matched"],
                                c2["mean_jaccard_category_pairs"])
    # The point-estimate rule's result is kept under point_*; *_supported is the interval's verdict.
    got = {k: c2.get(f"point_{k}", c2[k]) if k == "distinct_supported" else c2[k] for k in expected}
    assert got == json.loads(json.dumps(expected))
    assert c2["distinct_supported"] in (True, False, None) and c2["overlap_vs_baseline_supported"] in (True, False)
    assert "Benign baselines" in report and "| same q" in report and "matched" in report
    summary = summary_text(m, str(out))
    assert "benign mask" in summary and "matched     benign \\ retain" in summary


def _check_intervals(m, out, report):
    """The bootstrap intervals and verdicts of claims 1 and 2 recomputed with NumPy from the
    per-answer NLLs in the evaluation units on disk, with the run's seed: harmful answers
    resampled within their categories, benign answers as one set, drawn in that set order
    ("benign", then "harmful" category by category) from one Generator, every model at the same
    indices; 95% intervals as order statistics (the 2.5% and 97.5% inverted-CDF quantiles)."""
    ev = next((out / "cache").glob("evaluation-*"))
    files = {"unpruned": "unpruned", **{e["name"]: os.path.basename(e["dir"]) for e in m["category_masks"]},
             **{r["name"]: f"{kind}_q{r['q']:g}" for kind, rows in (("harm", m["sweep"]), ("random", m["random_control"]))
                for r in rows}}
    unit = {name: json.load(open(ev / f"{f}.json"))["per_prompt"] for name, f in files.items()}
    cats = np.array(unit["unpruned"]["harm_categories"])
    boot = m["bootstrap"]
    assert boot["seed"] == m["settings"]["seed"] and boot["resamples"] == 2000
    rng, n = np.random.default_rng(boot["seed"]), boot["resamples"]
    idx_b = rng.integers(0, len(unit["unpruned"]["benign_nll"]), (n, len(unit["unpruned"]["benign_nll"])))
    idx_h = np.empty((n, len(cats)), int)
    for c in sorted(set(cats)):
        members = np.flatnonzero(cats == c)
        idx_h[:, members] = members[rng.integers(0, len(members), (n, len(members)))]

    def mean(name, key, idx):  # per resample; the NLLs here are all finite
        return np.asarray(unit[name][key])[idx].mean(axis=1)

    def ci(x):
        return list(np.quantile(x, [0.025, 0.975], method="inverted_cdf"))

    def d(name, key="harm_nll", cols=slice(None)):
        idx = idx_b if key == "benign_nll" else idx_h[:, cols]
        return mean(name, key, idx) - mean("unpruned", key, idx)

    assert np.mean(unit["unpruned"]["harm_nll"]) == pytest.approx(m["baseline"]["harm_nll"])
    verdicts = []
    for row, ctrl in zip(m["sweep"], m["random_control"]):
        dh, db, dc = d(row["name"]), d(row["name"], "benign_nll"), d(ctrl["name"])
        sel = np.where(db > 0, dh / np.where(db > 0, db, 1), np.sign(dh) * np.inf)
        margin = dh - 2 * np.maximum(dc, 0)
        np.testing.assert_allclose(row["ci"]["d_harm"], ci(dh), rtol=1e-9)
        np.testing.assert_allclose(row["ci"]["d_benign"], ci(db), rtol=1e-9)
        np.testing.assert_allclose(ctrl["ci"]["d_harm"], ci(dc), rtol=1e-9)
        np.testing.assert_allclose(row["ci"]["vs_random"], ci(margin), rtol=1e-9)
        clear = ci(dh)[0] >= 0.05 and ci(dh - 2 * np.maximum(db, 0))[0] >= 0 and ci(margin)[0] >= 0
        point = row["d_harm"] >= 0.05 and row["d_harm"] >= 2 * max(row["d_benign"], 0) \
            and row["d_harm"] >= 2 * max(ctrl["d_harm"], 0)
        verdicts.append("shown" if point and clear else ("inconclusive" if point else "not shown"))
    c1 = m["claims"]["1"]
    expected = "shown" if "shown" in verdicts else ("inconclusive" if "inconclusive" in verdicts else "not shown")
    assert c1["verdict"] == expected and c1["supported"] == (expected == "shown")
    # Transfer: the category masks' diagonal and off-diagonal means over the categories.
    cols = {c: np.flatnonzero(cats == c) for c in CATEGORIES}
    diag = np.mean([d(c, cols=cols[c]) for c in CATEGORIES], axis=0)
    off = np.mean([d(a, cols=cols[b]) for a in CATEGORIES for b in CATEGORIES if a != b], axis=0)
    t = m["claims"]["2"]["transfer_ci"]
    np.testing.assert_allclose(t["diagonal"], ci(diag), rtol=1e-9)
    np.testing.assert_allclose(t["off_diagonal"], ci(off), rtol=1e-9)
    r = c1["smallest_selective"] or c1["strongest"]
    low, high = r["ci"]["d_harm"]
    assert f"{r['d_harm']:+.3f} [{low:+.3f}, {high:+.3f}]" in report  # printed beside the number


def _check_over_refusal(m, out, report):
    """The over-refusal section: the unpruned model, the headline harm mask and its random
    control, each rate a recount of the stage's stored answers with the detector."""
    from harmjax.evaluate.over_refusal import OVER_REFUSAL_PHRASES
    from harmjax.evaluate.refusal import is_refusal

    assert "## Over-refusal" in report
    ov = m["over_refusal"]
    names = list(ov)  # the headline harm mask (q nearest category_q) and the random mask of its q
    assert len(names) == 3 and names[0] == "unpruned" and names[1] == "harm q=0.1" and names[2] == "random q=0.1"
    stage = next((out / "cache").glob("over_refusal-*"))
    for name, r in ov.items():
        assert r["over_refusal"]["n"] == 9 and r["unsafe_refusal"]["n"] >= 1  # one safe prompt per kind
        answers = json.load(open(next(stage.glob(f"{name.replace(' ', '_').replace('=', '')}.json"))))["samples"]
        safe = [is_refusal(s["answer"], phrases=OVER_REFUSAL_PHRASES, min_words=0) for s in answers if s["label"] == "safe"]
        assert r["over_refusal"]["k"] == sum(safe) and f"| {name} |" in report


def test_killed_mid_stage_resumes_without_redoing_work(setup, uninterrupted, tmp_path):
    _, overrides = setup
    out = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HARMJAX_XLA_CACHE": "off"}
    proc = subprocess.Popen([sys.executable, "-m", "launch.run", "--config=configs/embedded.py",
                             *as_flags(overrides, out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Kill it once the scores stage has finished its first unit (the answers stage is done by then).
    deadline = time.time() + 300
    first_unit = None
    while time.time() < deadline and first_unit is None and proc.poll() is None:
        for stage in (out / "cache").glob("scores-*") if (out / "cache").exists() else []:
            done = sorted(stage.glob("harm_*/DONE.json"))
            if done:
                first_unit = done[0]
        time.sleep(0.05)
    assert first_unit is not None, proc.stderr.read()[-3000:] if proc.poll() is not None else "timed out"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    answers_done = next((out / "cache").glob("answers-*/DONE.json"))
    stamps = {p: p.stat().st_mtime_ns for p in (answers_done, first_unit)}
    assert not next((out / "cache").glob("scores-*")).joinpath("DONE.json").exists()

    # A disk too small for the score units still to write fails at once, naming what it needs
    # (3 categories + their sum + retain + benign = 6 units, minus those finished before the
    # kill: at least the first, more when the kill came late), and keeps everything finished.
    from harmjax.errors import DiskSpaceError
    from harmjax.io import disk_space

    finished = len(list(first_unit.parent.parent.glob("*/DONE.json")))
    real = disk_space.shutil.disk_usage
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(disk_space.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
        with pytest.raises(DiskSpaceError, match=rf"scores stage \({6 - finished} candidate units of .* only 1000 B free"):
            run_experiment(_config(overrides, out), progress=False)

    # A scan step that cannot fit the device fails before its first batch, with one line naming
    # the bytes and the knobs, and keeps everything finished.
    from harmjax.errors import DeviceMemoryError
    from harmjax.memory import LIMIT_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(LIMIT_ENV, "65536")
        with pytest.raises(DeviceMemoryError, match=r"harm scan step .* needs [\d,]+ B .* 65,536 B .* batch_size=4"):
            run_experiment(_config(overrides, out), progress=False)

    # Taking the error's advice (a smaller batch, remat) resumes the same scores stage: speed
    # knobs are not part of its key, so the finished units are kept.
    scores_dir = next((out / "cache").glob("scores-*"))
    m = run_experiment(_config(overrides + [("scoring.batch_size", 2), ("scoring.remat", True)], out), progress=False)
    assert m["timings"]["answers"]["cached"] and not m["timings"]["scores"]["cached"]
    assert Path(m["timings"]["scores"]["dir"]) == scores_dir
    for p, stamp in stamps.items():
        assert p.stat().st_mtime_ns == stamp, f"{p} was redone"
    # The same results as the uninterrupted run, every number of the report: exact counts, NLLs
    # and rates to float32 rounding (the resumed scores took other batches: masks agree to rounding).
    _, whole = uninterrupted
    for key in RESULT_KEYS:
        assert_same_results(whole[key], m[key], rel=1e-5, abs_tol=1e-6, skip=("seconds", "dir"), where=key)


def _dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_sparse_scores_give_bit_identical_masks_to_dense_scores(setup, tmp_path):
    """The default (per-matrix candidates, no dense tree on disk) against keep_dense_scores=True
    (today's dense float32 trees + select): every mask is the same set of weights, the candidates
    of harm_all (summed in memory) are those of the dense sum on disk, bit for bit, and the dense
    uint8 mask copy appears only on request."""
    from harmjax.masks import load_mask_indices, load_scores, top_candidates
    from harmjax.masks.storage import load_candidates

    root, overrides = setup
    out = tmp_path / "run"
    sparse = run_experiment(_config(overrides, out), progress=False)
    dense = run_experiment(_config(overrides + [("scoring.keep_dense_scores", True), ("masks.dense_copy", True)], out),
                           progress=False)
    assert dense["timings"]["answers"]["cached"] and not dense["timings"]["scores"]["cached"]
    sc_sparse, sc_dense = (Path(r["timings"]["scores"]["dir"]) for r in (sparse, dense))
    assert sc_sparse != sc_dense
    # No dense score tree (orbax or checkpoint) in the sparse stage; one per unit in the dense stage.
    assert not list(sc_sparse.rglob("scores")) and not list(sc_sparse.glob("*.ckpt"))
    dense_units = sorted(p.parent.name for p in sc_dense.glob("*/scores"))
    assert dense_units == sorted(p.parent.name for p in sc_sparse.glob("*/candidates.safetensors"))
    # Candidates: 12 bytes for each of floor(0.1 * |M|) entries per matrix (q up to 0.1 here), where the
    # dense trees take 4 bytes per weight.
    assert _dir_bytes(sc_sparse) * 2 < _dir_bytes(sc_dense)
    # The disk budget (README table) bounds what was written: candidates at 12 B per entry.
    from harmjax.config import ModelConfig
    from harmjax.experiments.main.disk_budget import experiment_output_bytes

    model_dir = dict(overrides)["model"]
    config = ModelConfig.from_hf(json.load(open(os.path.join(model_dir, "config.json"))))
    budget = experiment_output_bytes(config, _config(overrides, out), len(CATEGORIES))
    files = list(sc_sparse.glob("*/candidates.safetensors"))
    assert len(files) == len(CATEGORIES) + 3
    for f in files:  # floor(f * |M|) entries per matrix, f = max(q_sweep, category_q, p) = 0.1
        cands, shapes, summary = load_candidates(str(f.parent))
        assert summary["top_fraction"] == 0.1
        for n, shape in shapes.items():
            assert len(cands[n][0]) == len(cands[n][1]) == int(0.1 * np.prod(shape)), n
    assert sum(f.stat().st_size for f in files) <= budget["scores"]
    mask_files = list(Path(sparse["timings"]["masks"]["dir"]).glob("*/mask_indices.safetensors"))
    assert sum(f.stat().st_size for f in mask_files) <= budget["masks"]
    baseline_files = list(Path(sparse["timings"]["baselines"]["dir"]).glob("*/mask_indices.safetensors"))
    assert baseline_files and sum(f.stat().st_size for f in baseline_files) <= budget["baselines"]

    # harm_all: its candidates equal the top entries of the dense tree, indices and values bitwise.
    dense_all, _ = load_scores(str(sc_dense / "harm_all"))
    # ... and, S being linear in the examples, the one scan over the pruning set equals the sum
    # of the category scans within float32 rounding (a check of the scan's per-example sums:
    # padding rows and batch composition differ between the two).
    total = None
    for cat in CATEGORIES:
        tree, _ = load_scores(str(sc_dense / f"harm_{slug(cat)}"))
        total = tree if total is None else jax.tree.map(np.add, total, tree)
    for name, ref in flatten(dense_all).items():
        got = np.asarray(flatten(total)[name])
        ref = np.asarray(ref)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max(), err_msg=name)
    cands, shapes, summary = load_candidates(str(sc_sparse / "harm_all"))
    ref = top_candidates(dense_all, summary["top_fraction"])
    for name, (idx, values) in ref.items():
        np.testing.assert_array_equal(cands[name][0], idx, err_msg=name)
        np.testing.assert_array_equal(cands[name][1].view(np.uint32), values.view(np.uint32), err_msg=name)

    # Every mask: the same flat indices; sparse files only, the dense copy only when asked.
    mk_sparse, mk_dense = (Path(r["timings"]["masks"]["dir"]) for r in (sparse, dense))
    names = sorted(p.name for p in mk_sparse.iterdir() if p.is_dir())
    assert names == sorted(p.name for p in mk_dense.iterdir() if p.is_dir()) and len(names) == 8
    for name in names:
        a, _ = load_mask_indices(str(mk_sparse / name))
        b, _ = load_mask_indices(str(mk_dense / name))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} {k}")
        assert not (mk_sparse / name / "mask.safetensors").exists()
        assert (mk_dense / name / "mask.safetensors").exists() == name.startswith("harm_")
    assert [r["harm_nll"] for r in sparse["sweep"]] == [r["harm_nll"] for r in dense["sweep"]]
    assert sparse["overlap"] == dense["overlap"]

    # One retain kind per pass (the paper configs, for device memory): the retain candidates are
    # bitwise those of the two-kind pass; benign signed is scored too (equal up to float32
    # rounding of a different program, so only its shape is checked here). A speed knob is not
    # part of the scores stage's key (a resumed run may change it), so this runs in its own
    # output directory; the same settings there give the same stage key.
    split = run_experiment(_config(overrides + [("scoring.separate_retain_passes", True)], tmp_path / "split"),
                           progress=False)
    sc_split = Path(split["timings"]["scores"]["dir"])
    assert not split["timings"]["scores"]["cached"] and sc_split.name == sc_sparse.name
    a, shapes_a, _ = load_candidates(str(sc_sparse / "retain"))
    b, shapes_b, _ = load_candidates(str(sc_split / "retain"))
    assert shapes_a == shapes_b
    for n in a:
        np.testing.assert_array_equal(a[n][0], b[n][0], err_msg=n)
        np.testing.assert_array_equal(a[n][1].view(np.uint32), b[n][1].view(np.uint32), err_msg=n)
    c, _, _ = load_candidates(str(sc_split / "benign_signed"))
    assert {n: len(v[0]) for n, v in c.items()} == {n: len(v[0]) for n, v in a.items()}
