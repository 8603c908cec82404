"""The main experiment (`harmjax.experiments.run_experiment`, what `launch.run` calls) on a tiny
random gpt-oss model saved with a tokenizer: every stage runs unchanged, and the report's MoE
section shows the per-expert heatmap and the concentration of the harm masks against their
random controls, recomputed here with NumPy from the masks on disk."""

import json
import math

import numpy as np
import pytest

from configs.embedded import get_config
from harmjax.experiments import run_experiment
from harmjax.experiments.main.masks import q_label
from harmjax.masks import load_mask
from tests.config_overrides import with_overrides, write_prompt_files
from tests.hf_reference import save_tiny_with_tokenizer
from tests.moe_reference import tiny_moe_model
from tests.test_pipeline import OVERRIDES

Q_SWEEP = (0.02, 0.1)
# The pipeline test's small settings, smaller still: two categories, no benign-cost search.
_REPLACED = ("masks.q_sweep", "answers.max_new_tokens", "scoring.batch_size", "scoring.abs_chunk",
             "answers.batch_size", "answers.chunk")
MOE_OVERRIDES = [kv for kv in OVERRIDES if kv[0] not in _REPLACED] + [
    ("masks.q_sweep", Q_SWEEP), ("masks.headline_q", 0.1), ("baselines.enabled", False),
    ("answers.max_new_tokens", 6), ("evaluation.generation_prompts", 2),
    # Fewer, larger batches: fewer steps on CPU (34 s instead of 53 s for the run).
    ("scoring.batch_size", 8), ("scoring.abs_chunk", 8), ("answers.batch_size", 16), ("answers.chunk", 16),
]


def _numpy_concentration(mask_dir, n_experts):
    """Share of pruned expert weights in the top 10% of (layer, expert) units, from the dense
    mask: gpt-oss' fused tensors hold expert e at [e]."""
    mask, _ = load_mask(str(mask_dir))
    units = []
    for layer, block in sorted(mask["model"]["layers"].items(), key=lambda kv: int(kv[0])):
        experts = block["mlp"]["experts"]
        per = sum(np.asarray(experts[k]).reshape(n_experts, -1).sum(axis=1) for k in ("gate_up_proj", "down_proj"))
        units.extend(per.tolist())
    units = np.sort(np.array(units))[::-1]
    k = max(1, math.ceil(0.1 * len(units)))
    return units[:k].sum() / units.sum()


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_moe")
    model_dir = save_tiny_with_tokenizer(tiny_moe_model("gpt_oss", seed=5), root / "model")
    harmful, benign = write_prompt_files(root, {"crime": 5, "hate": 5}, {"facts": 5, "code": 5})
    overrides = MOE_OVERRIDES + [("model", model_dir), ("prompts.harmful", str(harmful)),
                                 ("prompts.benign", str(benign))]
    out = root / "run"
    return out, run_experiment(with_overrides(get_config(), overrides, out), progress=False)


def test_main_experiment_on_moe_reports_where_the_mask_falls(moe_run):
    out, m = moe_run
    assert m["model"]["family"] == "gpt_oss"
    # Every stage ran and the generic report is there.
    for name in ("report.md", "metrics.json", "harm_vs_utility.png", "mask_layers.png", "mask_experts.png"):
        assert (out / name).is_file(), name
    assert (out / "mask_experts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert m["plots"]["experts"] == "mask_experts.png"
    report = (out / "report.md").read_text()
    assert "among the experts (MoE)" in report and "](mask_experts.png)" in report
    assert [r["q"] for r in m["sweep"]] == [r["q"] for r in m["random_control"]] == list(Q_SWEEP)

    experts = m["experts"]
    assert json.load(open(out / "metrics.json"))["experts"]["rows"] == json.loads(json.dumps(experts["rows"]))
    assert not experts["selection_fixes_spread"]  # fused tensors: the scores choose the experts
    masks_dir = next((out / "cache").glob("masks-*"))
    n_exp = 4  # tests/moe_reference.py's gpt_oss
    for row in experts["rows"]:
        for kind in ("harm", "random"):
            want = _numpy_concentration(masks_dir / f"{kind}_q{q_label(row['q'])}", n_exp)
            assert row[kind]["share"] == pytest.approx(want, rel=1e-12), (kind, row["q"])
            assert f"{row[kind]['share']:.1%}" in report
        assert row["harm"]["units"] == 2 * n_exp and row["harm"]["top_units"] == 1
        # Both masks prune as many expert weights: the control keeps the count per matrix.
        assert row["harm"]["pruned"] == row["random"]["pruned"] > 0

    # The headline mask's counts outside the experts are the mask's own router and attention counts.
    headline, _ = load_mask(str(masks_dir / "harm_q0.1"))
    c = experts["counts"]
    for layer, block in headline["model"]["layers"].items():
        assert c["router"][layer] == int(np.sum(block["mlp"]["router"]["weight"]))
        assert c["attention"][layer] == sum(int(np.sum(v["weight"])) for v in block["self_attn"].values())
