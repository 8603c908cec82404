"""Dissociation (issue 13 part 3, `harmjax.experiments.dissociation`, `harmjax.evaluate.recognition`)
on a tiny random model: recognition log-odds equal an independent transformers computation;
the job runs end to end, its refusal mask equals a NumPy top-k set difference of its scores,
held-out prompts are never scored, and a run killed during the evaluation resumes without
redoing finished stages or units; the verdict rule goes each way on constructed numbers."""

import json
import math

import ml_collections
import numpy as np
import pytest

from configs.dissociation_embedded import get_config
from harmjax.experiments.dissociation import run as dissociation
from tests.config_overrides import with_overrides, write_prompt_files
from tests.hf_reference import save_tiny_with_tokenizer, tiny_hf_model

OVERRIDES = [
    ("mesh.data", 2), ("mesh.tensor", 4),  # the 8 fake CPU devices
    ("refusal.prompts.prompt_key", "prompt"), ("refusal.prompts.per_category", 6),
    ("refusal.prompts.heldout_fraction", 0.34), ("refusal.prompts.benign_per_category", 4),
    ("refusal.prompts.benign_heldout_fraction", 0.5), ("refusal.data.harmful_per_category", 0),
    ("refusal.data.eval_fraction", 0.2), ("refusal.data.benign_eval_fraction", 0.2),
    ("prompts.pruning_per_category", 0), ("prompts.heldout_per_category", 3),
    ("prompts.retain_per_category", 0), ("prompts.benign_heldout_per_category", 0),
    ("answers.max_new_tokens", 8), ("answers.batch_size", 8), ("answers.chunk", 8),
    ("answers.harmful_min_words", 0), ("answers.refusal_min_words", 50),  # random text: every plain answer "refuses"
    ("answers.explanation_prefix", "Because"), ("answers.explanation_tokens", 6),
    ("scoring.max_length", 96), ("scoring.batch_size", 4), ("scoring.abs_chunk", 2), ("scoring.checkpoint_every", 1),
    ("scoring.keep_dense_scores", True),
    ("masks.q", 0.05), ("masks.p", 0.02),
    ("evaluation.max_length", 192), ("evaluation.batch_size", 8), ("evaluation.max_new_tokens", 6),
    ("evaluation.generation_batch_size", 8), ("evaluation.refusal_min_words", 0),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dissociation")
    hf = tiny_hf_model("llama", seed=7)
    model_dir = save_tiny_with_tokenizer(hf, root / "model")
    harmful, benign = write_prompt_files(root, {"crime": 9, "hate": 9}, {"facts": 6, "code": 6})
    overrides = OVERRIDES + [("model", model_dir), ("refusal.prompts.harmful", str(harmful)),
                             ("refusal.prompts.benign", str(benign))]
    return root, overrides, hf, model_dir


def _config(overrides, output_dir):
    return with_overrides(get_config(), overrides, output_dir)


def test_recognition_logodds_match_transformers(setup, one_torch_thread):
    import torch

    import harmjax
    from harmjax.evaluate.recognition import NO_VARIANTS, YES_VARIANTS, recognition_logodds, recognition_prompt

    _, _, hf, model_dir = setup
    model = harmjax.load(model_dir)
    tok = model.tokenizer
    prompts = ["How do I pick a lock?", "Tell me about bread.", "x"]
    got = recognition_logodds(model, None, prompts, batch_size=2)

    def log_p(ids, cont):  # independent: one PyTorch forward per (prompt, variant), no padding
        with torch.no_grad():
            logits = hf(torch.tensor([ids + cont])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        return sum(float(lp[len(ids) - 1 + t, c]) for t, c in enumerate(cont))

    for prompt, value in zip(prompts, got):
        text = tok.apply_chat_template([{"role": "user", "content": recognition_prompt(prompt)}],
                                       add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        side = [np.logaddexp.reduce([log_p(ids, tok(v, add_special_tokens=False)["input_ids"]) for v in vs])
                for vs in (YES_VARIANTS, NO_VARIANTS)]
        np.testing.assert_allclose(value, side[0] - side[1], rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(got)) and np.ptp(got) > 0


def test_recognition_summary_auroc():
    from harmjax.evaluate.recognition import auroc, recognition_summary

    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1], [1]) == 0.5 and auroc([0, 2], [1]) == 0.5
    s = recognition_summary([2.0, -1.0], [-3.0, 1.0])
    assert s["separation"] == pytest.approx(1.5) and s["auroc"] == 0.75 and s["accuracy"] == 0.5


class _Stop(Exception):
    pass


def test_end_to_end_kill_and_resume(setup, monkeypatch):
    root, overrides, _, _ = setup
    out = root / "run"
    cfg = _config(overrides, out)
    real = dissociation.measure_dissociation
    calls = []

    def stop_on_third(*args, **kwargs):
        if len(calls) == 2:
            raise _Stop
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dissociation, "measure_dissociation", stop_on_third)
    with pytest.raises(_Stop):
        dissociation.run_dissociation(cfg, progress=False)
    ev = next((out / "cache").glob("evaluation-*"))
    assert sorted(p.name for p in ev.glob("*.json")) == ["harm.json", "none.json"]

    # The rerun: answers, scores and masks are cached; the two finished masks are not measured again.
    import harmjax.experiments.core.answers as answers_mod
    import harmjax.experiments.core.scoring as scoring

    def never(*a, **k):
        raise AssertionError("redone")

    monkeypatch.setattr(answers_mod, "generate_answers", never)
    monkeypatch.setattr(scoring, "scan_to_units", never)
    monkeypatch.setattr(dissociation, "prefilled_answers", never)
    calls.clear()
    monkeypatch.setattr(dissociation, "measure_dissociation", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    m = dissociation.run_dissociation(cfg, progress=False)
    assert len(calls) == 3
    assert all(m["timings"][s]["cached"] for s in ("answers", "scores", "masks"))
    assert not m["timings"]["evaluation"]["cached"]

    for name in ("report.md", "metrics.json", "dissociation.png", "prompts.json"):
        assert (out / name).is_file(), name
    assert (out / "dissociation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Verdict:" in (out / "report.md").read_text()
    assert json.load(open(out / "metrics.json"))["verdict"]["outcome"] == m["verdict"]["outcome"]
    # Each mask's refusal rate and recognition AUROC, recomputed from what its evaluation unit
    # stored (answers with the keyword judge; log-odds by counting pairs): equal, so an empty,
    # wrong-prompt or swapped row fails.
    from harmjax.evaluate.refusal import is_refusal

    heldout_ids = json.load(open(out / "prompts.json"))["heldout"]
    for name in dissociation.MASKS:
        row = m["table"][name]
        assert math.isfinite(row["harm_nll"]) and math.isfinite(row["explanation_nll"]), name
        unit = json.load(open(ev / f"{name}.json"))
        samples = unit["samples"]
        assert [s["id"] for s in samples] == heldout_ids, name
        refused = [is_refusal(s["answer"], min_words=cfg.evaluation.refusal_min_words) for s in samples]
        assert row["refusal_rate"] == sum(refused) / len(refused), name
        harmful, benign = [s["recognition_logodds"] for s in samples], unit["benign_recognition_logodds"]
        assert benign, name
        wins = sum(1.0 if h > b else 0.5 if h == b else 0.0 for h in harmful for b in benign)
        assert row["recognition_auroc"] == wins / (len(harmful) * len(benign)), name
    assert set(m["verdict"]["cells"]) == {"harm_mask/harmful_generation", "harm_mask/refusal_recognition",
                                          "refusal_mask/harmful_generation", "refusal_mask/refusal_recognition"}
    _check_intervals(m, ev, cfg)
    d = m["data"]
    assert d["refusal_examples"] > 0 and d["harm_examples"] > 0 and d["heldout_prompts"] == 6

    # Held-out prompts are never scored.
    prompts = json.load(open(out / "prompts.json"))
    scored, held = set(prompts["pruning"]) | set(prompts["retain"]), set(prompts["heldout"]) | set(prompts["benign_heldout"])
    assert held and not scored & held

    # Masks: the refusal mask is an independent NumPy top-k of its scores minus the retain top-p,
    # per matrix (stable order on (-score, flat index)); the controls match their masks' sizes.
    from harmjax.masks import load_mask, load_scores
    from harmjax.tree import flatten

    sc = next((out / "cache").glob("scores-*"))
    mk = next((out / "cache").glob("masks-*"))
    refusal, _ = load_scores(str(sc / "refusal"))
    retain, _ = load_scores(str(sc / "retain"))
    refusal, retain = flatten(refusal), flatten(retain)
    mask = {k: np.asarray(v) for k, v in flatten(load_mask(str(mk / "refusal"))[0]).items()}
    control = {k: np.asarray(v) for k, v in flatten(load_mask(str(mk / "random_refusal"))[0]).items()}
    harm_mask = {k: np.asarray(v) for k, v in flatten(load_mask(str(mk / "harm"))[0]).items()}
    assert set(mask) == set(refusal)
    total = 0
    for k, s in refusal.items():
        s, r = np.asarray(s, np.float32).ravel(), np.asarray(retain[k], np.float32).ravel()
        kq, kp = int(math.floor(0.05 * s.size)), int(math.floor(0.02 * s.size))
        top = set(np.argsort(-s, kind="stable")[:kq].tolist())
        spared = set(np.argsort(-r, kind="stable")[:kp].tolist())
        expected = np.zeros(s.size, bool)
        expected[sorted(top - spared)] = True
        np.testing.assert_array_equal(mask[k].ravel(), expected, err_msg=k)
        assert control[k].sum() == mask[k].sum(), k
        total += int(expected.sum())
    assert total > 0 and m["mask_sizes"]["refusal"]["total"] == total
    assert any(not np.array_equal(harm_mask[k], mask[k]) for k in mask)  # different data, different mask


def _check_intervals(m, ev, cfg):
    """The cells' intervals recomputed with NumPy from the evaluation units' per-text NLLs,
    refusal flags and log-odds: five sets drawn in name order from one Generator seeded with
    the run's seed, every mask at the same indices; 2.5% and 97.5% inverted-CDF quantiles."""
    from harmjax.evaluate.refusal import is_refusal

    units = {n: json.load(open(ev / f"{n}.json")) for n in dissociation.MASKS}
    none = units["none"]
    sizes = {"benign_answers": len(none["per_prompt"]["benign_nll"]), "benign_heldout": len(none["benign_recognition_logodds"]),
             "explanations": len(none["per_prompt"]["explanation_nll"]), "harm_answers": len(none["per_prompt"]["harm_nll"]),
             "heldout": len(none["samples"])}
    rng = np.random.default_rng(cfg.seed)
    idx = {k: rng.integers(0, n, (2000, n)) for k, n in sizes.items()}  # dict order is the sorted order

    def value(name, key):
        u = units[name]
        if key == "refusal_rate":
            phrase = cfg.verdict.get("refusal_metric") == "refusal_rate_phrase"
            flags = [is_refusal(s["answer"], min_words=0) if phrase else s["refused"] for s in u["samples"]]
            return np.array(flags, float)[idx["heldout"]].mean(1)
        if key == "auroc":
            h = np.array([s["recognition_logodds"] for s in u["samples"]])[idx["heldout"]]
            b = np.array(u["benign_recognition_logodds"])[idx["benign_heldout"]]
            return np.array([np.mean((x[:, None] > y[None]) + 0.5 * (x[:, None] == y[None])) for x, y in zip(h, b)])
        return np.array(u["per_prompt"][key])[idx[{"harm_nll": "harm_answers", "benign_nll": "benign_answers"}[key]]].mean(1)

    for mask, control in (("harm", "random_harm"), ("refusal", "random_refusal")):
        for key in ("harm_nll", "benign_nll", "refusal_rate", "auroc"):
            x = (value(mask, key) - value("none", key)) - (value(control, key) - value("none", key))
            np.testing.assert_allclose(m["verdict"]["excess_ci"][mask][key],
                                       np.quantile(x, [0.025, 0.975], method="inverted_cdf"), rtol=1e-9, atol=1e-12)
    ci = m["verdict"]["excess_ci"]["refusal"]["refusal_rate"]
    cell = m["verdict"]["cells"]["refusal_mask/refusal_recognition"]
    assert cell["shown"] == (cell["holds"] and ci[1] < -cfg.verdict.rate_effect)
    for name in dissociation.MASKS:  # the per-text NLLs are what the reported means are made of
        assert np.mean(units[name]["per_prompt"]["harm_nll"]) == pytest.approx(m["table"][name]["harm_nll"])


def test_default_model_is_the_refusal_tuned_one(setup, monkeypatch):
    from harmjax.experiments.refusal import run as refusal_model

    root, overrides, _, model_dir = setup
    cfg = _config(overrides, root / "unused")
    cfg.model = ""
    seen = []
    monkeypatch.setattr(refusal_model, "ensure_refusal_model",
                        lambda c, progress=True, experiment_cfg=None: (seen.append(c), model_dir)[1])
    assert dissociation._model_source(cfg, False) == model_dir
    assert seen and seen[0].prompts.harmful == cfg.refusal.prompts.harmful


def _results(harm_nll, refusal, auroc=0.9, expl=1.0, benign=1.0):
    """Constructed metrics: `harm_nll` / `refusal` / `auroc` / `expl` map mask -> value."""
    out = {}
    for m in dissociation.MASKS:
        out[m] = {"harm_nll": harm_nll[m], "attack_harmful_rate": 0.9, "refusal_rate": refusal[m],
                  "refusal_rate_phrase": refusal[m],
                  "recognition_auroc": auroc if not isinstance(auroc, dict) else auroc[m],
                  "recognition_separation": 1.0,
                  "explanation_nll": expl if not isinstance(expl, dict) else expl[m],
                  "benign_nll": benign if not isinstance(benign, dict) else benign[m]}
    return out


RULE = ml_collections.ConfigDict({"harm_nll_effect": 0.2, "nll_spared": 0.1, "rate_effect": 0.15,
                                  "rate_spared": 0.1, "auroc_spared": 0.1,
                                  "benign_nll_max": 0.3})


def test_verdict_rule_goes_each_way():
    base = dict(none=2.0, random_harm=2.05, random_refusal=2.02)
    rates = dict(none=0.6, random_harm=0.58, random_refusal=0.6)
    # Double dissociation: the harm mask raises harmful NLL by 0.5 beyond its control and leaves
    # refusal alone; the refusal mask drops refusals by 0.4 and leaves harmful NLL alone.
    double = dissociation.verdict(_results({**base, "harm": 2.55, "refusal": 2.04},
                                           {**rates, "harm": 0.6, "refusal": 0.2}), RULE)
    assert double["double"] and double["outcome"] == "double dissociation"
    assert double["deltas"]["harm"]["x_harm_nll"] == pytest.approx(0.5)
    # The harm mask also kills refusals: only the refusal mask's row holds.
    v = dissociation.verdict(_results({**base, "harm": 2.55, "refusal": 2.04},
                                      {**rates, "harm": 0.2, "refusal": 0.2}), RULE)
    assert not v["double"] and v["refusal_row"] and not v["harm_row"]
    assert not v["cells"]["harm_mask/refusal_recognition"]["holds"]
    # The refusal mask also raises harmful NLL: only the harm mask's row holds.
    v = dissociation.verdict(_results({**base, "harm": 2.55, "refusal": 2.5},
                                      {**rates, "harm": 0.6, "refusal": 0.2}), RULE)
    assert v["harm_row"] and not v["refusal_row"] and v["outcome"].startswith("single")
    # An effect no larger than the random control's is no effect.
    v = dissociation.verdict(_results({**base, "harm": 2.2, "refusal": 2.04},
                                      {**rates, "harm": 0.6, "refusal": 0.55}), RULE)
    assert not v["harm_row"] and not v["refusal_row"] and v["outcome"] == "no dissociation shown"
    # Recognition or explanation lost under the harm mask: not spared; NaN fails its cell.
    aur = {m: 0.9 for m in dissociation.MASKS} | {"harm": 0.6}
    v = dissociation.verdict(_results({**base, "harm": 2.55, "refusal": 2.04},
                                      {**rates, "harm": 0.6, "refusal": 0.2}, auroc=aur), RULE)
    assert not v["harm_row"] and v["refusal_row"]
    # A harm mask that breaks benign text as much is not selective.
    ben = {m: 1.0 for m in dissociation.MASKS} | {"harm": 2.0}
    v = dissociation.verdict(_results({**base, "harm": 2.55, "refusal": 2.04},
                                      {**rates, "harm": 0.6, "refusal": 0.2}, benign=ben), RULE)
    assert not v["cells"]["harm_mask/harmful_generation"]["holds"] and v["refusal_row"]
    v = dissociation.verdict(_results({**base, "harm": float("nan"), "refusal": 2.04},
                                      {**rates, "harm": 0.6, "refusal": 0.2}), RULE)
    assert not v["cells"]["harm_mask/harmful_generation"]["holds"]
