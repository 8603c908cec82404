"""The baselines comparison (`harmjax.experiments.baselines`) end to end on a
tiny random llama with a tokenizer: the report is written; every count-matched mask has the
harm mask's count in every matrix; the magnitude mask equals an independent NumPy ranking of
the transformers model's |W| outside the retain top-p; the refusal and over-refusal rates
equal the detectors applied to the stored answers; an interval equals a NumPy bootstrap of
the stored per-answer NLLs; and the reading rule goes each way on constructed numbers."""

import json
import math

import ml_collections
import numpy as np
import pytest

from configs.baselines_embedded import get_config
from harmjax.experiments.baselines import measures
from harmjax.experiments.baselines.run import run_baselines
from tests.config_overrides import with_overrides, write_prompt_files
from tests.hf_reference import save_tiny_with_tokenizer, tiny_hf_model

OVERRIDES = [
    ("mesh.data", 2), ("mesh.tensor", 4),  # the 8 fake CPU devices
    ("refusal.prompts.prompt_key", "prompt"), ("refusal.prompts.per_category", 6),
    ("refusal.prompts.heldout_fraction", 0.34), ("refusal.prompts.benign_per_category", 8),
    ("refusal.prompts.benign_heldout_fraction", 0.25), ("refusal.data.harmful_per_category", 0),
    ("refusal.data.eval_fraction", 0.2), ("refusal.data.benign_eval_fraction", 0.2),
    ("prompts.pruning_per_category", 2), ("prompts.heldout_per_category", 2),
    ("prompts.retain_per_category", 2), ("prompts.benign_heldout_per_category", 2),
    ("answers.max_new_tokens", 8), ("answers.batch_size", 8), ("answers.chunk", 8),
    ("answers.harmful_min_words", 0), ("answers.explanation_prefix", "Because"), ("answers.explanation_tokens", 8),
    ("scoring.max_length", 64), ("scoring.batch_size", 4), ("scoring.abs_chunk", 2),
    ("masks.q", 0.05), ("masks.p", 0.02),
    ("evaluation.max_length", 64), ("evaluation.batch_size", 8), ("evaluation.max_new_tokens", 6),
    ("evaluation.generation_batch_size", 8), ("evaluation.refusal_min_words", 0),
    ("direction.val_per_category", 2), ("direction.positions", 1), ("direction.batch_size", 8),
    ("direction.max_new_tokens", 6), ("direction.generation_batch_size", 8),
    ("over_refusal.safe_per_kind", 1), ("over_refusal.max_new_tokens", 6), ("over_refusal.batch_size", 8),
    ("labels", ("tiny",)),
]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    hf = tiny_hf_model("llama", seed=3)
    model_dir = save_tiny_with_tokenizer(hf, root / "model")
    harmful, benign = write_prompt_files(root, {"crime": 9, "hate": 9}, {"facts": 10, "code": 10})
    cfg = with_overrides(get_config(), OVERRIDES + [
        ("models", (model_dir,)), ("refusal.prompts.harmful", str(harmful)), ("refusal.prompts.benign", str(benign))],
        root / "run")
    return root, cfg, hf, run_baselines(cfg, progress=False)


def test_report_written(done):
    root, _, _, m = done
    out = root / "run"
    assert (out / "baselines.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "removes harmful generation" in text and "| direction |" in text
    saved = json.load(open(out / "metrics.json"))
    assert set(saved["models"]["tiny"]["readings"]) == set(measures.INTERVENTIONS[1:])


def test_masks_match_count_and_magnitude_reference(done):
    from harmjax.masks import load_candidates, load_mask_indices

    _, cfg, hf, m = done
    tiny = m["models"]["tiny"]
    masks = {n: load_mask_indices(f"{tiny['mask_dir']}/{n}")[0] for n in measures.MASKED}
    harm = masks["harm"]
    assert sum(len(v) for v in harm.values()) > 0
    for name in ("wanda", "magnitude", "random"):
        assert {k: len(v) for k, v in masks[name].items()} == {k: len(v) for k, v in harm.items()}, name
        assert tiny["sizes"][name]["total"] == tiny["sizes"]["harm"]["total"]
    assert any(not np.array_equal(masks["wanda"][k], harm[k]) for k in harm)
    # Magnitude: NumPy ranking of the transformers weights (|W| descending, ties by flat index),
    # the retain unit's top-p removed, the harm mask's count kept.
    units = f"{tiny['dir']}/cache"
    import glob

    retain, _, _ = load_candidates(glob.glob(f"{units}/scores-*/retain")[0])
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    for name, idx in masks["magnitude"].items():
        w = np.abs(state[name].astype(np.float32)).ravel()
        order = np.lexsort((np.arange(w.size), -w))
        spared = retain[name][0][:int(math.floor(cfg.masks.p * w.size))]
        expected = np.sort(order[~np.isin(order, spared)][:len(harm[name])])
        np.testing.assert_array_equal(idx, expected, err_msg=name)


def test_rates_equal_detectors_on_stored_answers(done):
    from harmjax.evaluate.over_refusal import OVER_REFUSAL_PHRASES
    from harmjax.evaluate.refusal import is_refusal

    _, _, _, m = done
    tiny = m["models"]["tiny"]
    for name in measures.INTERVENTIONS:
        unit = json.load(open(f"{tiny['evaluation_dir']}/{name}.json"))
        flags = [is_refusal(s["answer"], min_words=0) for s in unit["samples"]]
        assert tiny["values"][name]["refusal_rate"] == sum(flags) / len(flags), name
        safe = [s for s in unit["over_refusal"]["samples"] if s["label"] == "safe"]
        refused = [is_refusal(s["answer"], phrases=OVER_REFUSAL_PHRASES, min_words=0) for s in safe]
        assert len(safe) == 9 and tiny["values"][name]["over_refusal"] == sum(refused) / len(safe), name
    # The harm mask's harmful-NLL interval: NumPy bootstrap of the stored per-answer NLLs (sets
    # drawn in name order from one seeded Generator; paired with the unmodified model).
    ev = {n: json.load(open(f"{tiny['evaluation_dir']}/{n}.json")) for n in ("none", "harm")}
    rng = np.random.default_rng(0)
    sizes = {"benign_answers": len(ev["none"]["per_prompt"]["benign_nll"]),
             "benign_heldout": len(ev["none"]["benign_recognition_logodds"]),
             "harm_answers": len(ev["none"]["per_prompt"]["harm_nll"]), "heldout": len(ev["none"]["samples"]),
             "over_refusal_safe": 9}
    idx = {k: rng.integers(0, sizes[k], (2000, sizes[k])) for k in sorted(sizes)}
    d = (np.asarray(ev["harm"]["per_prompt"]["harm_nll"])[idx["harm_answers"]].mean(1)
         - np.asarray(ev["none"]["per_prompt"]["harm_nll"])[idx["harm_answers"]].mean(1))
    d.sort()
    assert tiny["ci"]["harm"]["harm_nll"] == pytest.approx([d[49], d[1949]], rel=1e-9)
    assert tiny["direction"]["addition"]["prompts"] == 4
    # Candidates: the last position of layers 0, 2, ... below 80% of 3 layers: layer 0 alone.
    assert tiny["direction"]["candidates"] == 1 and tiny["direction"]["layer"] == 0


def test_reading_rule_each_way():
    rule = ml_collections.ConfigDict({"harm_nll_effect": 0.2, "nll_spared": 0.1, "rate_effect": 0.15,
                                      "rate_spared": 0.1, "benign_nll_max": 0.3})
    base = {"benign_nll": 0.0, "recognition_auroc": 0.0, "over_refusal": 0.0}
    harm = measures.classify({**base, "harm_nll": 1.0, "refusal_rate": 0.05},
                             {"harm_nll": [0.5, 1.5], "refusal_rate": [-0.05, 0.1]}, rule)
    assert harm["reading"] == "removes harmful generation"
    ref = measures.classify({**base, "harm_nll": 0.02, "refusal_rate": -0.6},
                            {"harm_nll": [-0.05, 0.08], "refusal_rate": [-0.7, -0.5]}, rule)
    assert ref["reading"] == "removes refusal"
    wide = measures.classify({**base, "harm_nll": 0.02, "refusal_rate": -0.6},
                             {"harm_nll": [-0.3, 0.3], "refusal_rate": [-0.7, -0.5]}, rule)
    assert wide["reading"].startswith("removes refusal (inconclusive")
    both_down = measures.classify({**base, "harm_nll": 1.0, "refusal_rate": -0.6},
                                  {"harm_nll": [0.5, 1.5], "refusal_rate": [-0.7, -0.5]}, rule)
    assert both_down["reading"] == "neither"


def test_matched_difference_runs_out():
    side = {"w": (np.array([5, 4, 3]), None)}
    spared = {"w": (np.array([5, 4]), None)}
    assert measures.matched_difference(side, spared, {"w": (10,)}, {"w": 1}, 0.2)["w"].tolist() == [3]
    with pytest.raises(ValueError, match="candidates give"):
        measures.matched_difference(side, spared, {"w": (10,)}, {"w": 2}, 0.2)
