"""The main experiment (`harmjax.experiments.run_experiment`, what `launch.run` calls) on a tiny
random MoE model saved with a tokenizer: every stage runs unchanged, and the report's MoE
section shows the per-expert heatmap and the concentration of the harm masks against their
random controls, recomputed here with NumPy from the masks on disk.

The family is Qwen3-MoE (one leaf per expert, a dense mlp_only layer), where selection ranks a
layer's experts together (`harmjax.masks.groups`); gpt-oss' fused layout selects the same
entries (tests/test_select_groups.py) and runs here too by adding "gpt_oss" to FAMILIES (~60 s
more CI time)."""

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
from tests.moe_reference import MOE_FAMILIES, tiny_moe_model
from tests.test_pipeline import OVERRIDES

FAMILIES = ("qwen3_moe",)
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


def _per_expert(mask_dir, n_experts):
    """Pruned weights per (layer, expert) unit, from the dense mask: gpt-oss' fused tensors
    hold expert e at [e], per-expert files (Qwen3-MoE) have one subtree per expert; layers
    without experts (Qwen3-MoE's mlp_only_layers) have none."""
    mask, _ = load_mask(str(mask_dir))
    units = []
    for layer, block in sorted(mask["model"]["layers"].items(), key=lambda kv: int(kv[0])):
        experts = block["mlp"].get("experts")
        if experts is None:
            continue
        if "gate_up_proj" in experts:
            per = sum(np.asarray(experts[k]).reshape(n_experts, -1).sum(axis=1) for k in ("gate_up_proj", "down_proj"))
        else:
            per = np.array([sum(int(np.sum(m["weight"])) for m in experts[str(e)].values()) for e in range(n_experts)])
        units.append(per)
    return np.stack(units)


def _numpy_concentration(mask_dir, n_experts):
    """Share of pruned expert weights in the top 10% of (layer, expert) units."""
    units = _per_expert(mask_dir, n_experts).ravel()
    units = np.sort(np.array(units))[::-1]
    k = max(1, math.ceil(0.1 * len(units)))
    return units[:k].sum() / units.sum()


@pytest.fixture(scope="module", params=FAMILIES)
def moe_run(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("pipeline_moe")
    model_dir = save_tiny_with_tokenizer(tiny_moe_model(request.param, seed=5), root / "model")
    harmful, benign = write_prompt_files(root, {"crime": 5, "hate": 5}, {"facts": 5, "code": 5})
    overrides = MOE_OVERRIDES + [("model", model_dir), ("prompts.harmful", str(harmful)),
                                 ("prompts.benign", str(benign))]
    out = root / "run"
    return out, run_experiment(with_overrides(get_config(), overrides, out), progress=False), request.param


def test_main_experiment_on_moe_reports_where_the_mask_falls(moe_run):
    out, m, family = moe_run
    assert m["model"]["family"] == family
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
    # Granularity "matrix" ranks a layer's per-expert leaves together: the scores choose the experts.
    assert not experts["selection_fixes_spread"] and "granularity \"row\"" not in report
    masks_dir = next((out / "cache").glob("masks-*"))
    spec = MOE_FAMILIES[family]
    n_exp = spec.get("num_experts", spec.get("num_local_experts"))
    for row in experts["rows"]:
        per = {}
        for kind in ("harm", "random"):
            mask_dir = masks_dir / f"{kind}_q{q_label(row['q'])}"
            per[kind] = _per_expert(mask_dir, n_exp)
            want = _numpy_concentration(mask_dir, n_exp)
            assert row[kind]["share"] == pytest.approx(want, rel=1e-12), (kind, row["q"])
            assert f"{row[kind]['share']:.1%}" in report
        assert row["harm"]["units"] == per["harm"].size and row["harm"]["top_units"] == math.ceil(0.1 * per["harm"].size)
        # Both masks prune as many expert weights per layer (the control keeps each group's
        # count), but not expert by expert: per-matrix selection would give every expert the
        # same floor(q x size) less T_p and a control matched to it.
        assert row["harm"]["pruned"] == row["random"]["pruned"] > 0
        np.testing.assert_array_equal(per["harm"].sum(1), per["random"].sum(1))
        assert not np.array_equal(per["harm"], per["random"]), row["q"]

    # The headline mask's counts outside the experts are the mask's own router and attention counts.
    headline, _ = load_mask(str(masks_dir / "harm_q0.1"))
    c = experts["counts"]
    for layer, block in headline["model"]["layers"].items():
        if "experts" in block["mlp"]:
            router = block["mlp"]["router" if family == "gpt_oss" else "gate"]["weight"]
            assert c["router"][layer] == int(np.sum(router))
        assert c["attention"][layer] == sum(int(np.sum(v["weight"])) for v in block["self_attn"].values())
