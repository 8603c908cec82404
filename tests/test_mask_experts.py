"""`harmjax.masks.experts`: pruned weights per (layer, expert) of hand-built masks against a
NumPy count written here from the checkpoint layouts, for per-expert leaves (Qwen3-MoE with a
dense layer, Mixtral) and gpt-oss' fused 3-D tensors; and the top-10% concentration share."""

import re

import numpy as np
import pytest

from harmjax.attribution import scored_names
from harmjax.config import ModelConfig
from harmjax.masks import load_mask_indices, save_mask_indices
from harmjax.masks.experts import NotMoEError, concentration, expert_counts
from harmjax.model.param_specs import param_specs

BASE = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=1e4, head_dim=8)
FAMILIES = {
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=[1]),
    "mixtral": dict(num_local_experts=3, num_experts_per_tok=2),
}


def _config(family):
    return ModelConfig.from_hf({"model_type": family, **BASE, **FAMILIES[family]})


def _random_mask(config, seed):
    """A bool mask over the scored weights whose density differs per leaf, and in fused
    tensors per expert, so a count that mixes up experts or layers shows."""
    rng = np.random.default_rng(seed)
    specs = param_specs(config)
    mask = {}
    for name in scored_names(config):
        shape = specs[name].shape
        density = rng.uniform(0.0, 0.5, size=(shape[0],) + (1,) * (len(shape) - 1)) if len(shape) == 3 \
            else rng.uniform(0.0, 0.5)
        mask[name] = rng.random(shape) < density
    return mask


def _numpy_counts(mask, n_experts):
    """{layer: per-expert counts}, {kind: {layer: count}} straight from the names and shapes."""
    per_expert, other = {}, {"router": {}, "attention": {}, "dense": {}}
    for name, m in mask.items():
        layer = int(name.split(".")[2])
        row = per_expert.setdefault(layer, np.zeros(n_experts, np.int64))
        if m.ndim == 3:  # gpt-oss fused (E, ., .)
            row += m.reshape(m.shape[0], -1).sum(axis=1)
        elif (hit := re.search(r"\.experts\.(\d+)\.", name)):
            row[int(hit.group(1))] += m.sum()
        else:
            kind = ("attention" if ".self_attn." in name else
                    "router" if name.endswith(("mlp.gate.weight", "router.weight", "block_sparse_moe.gate.weight"))
                    else "dense")
            other[kind][layer] = other[kind].get(layer, 0) + int(m.sum())
    return per_expert, other


@pytest.mark.parametrize("family", list(FAMILIES))
def test_expert_counts_match_numpy(family, tmp_path):
    config = _config(family)
    mask = _random_mask(config, seed=len(family))
    want, other = _numpy_counts(mask, config.num_experts)
    got = expert_counts(mask, config)
    moe_layers = [int(k) for k in got["per_expert"]]
    assert moe_layers == ([0, 2] if family == "qwen3_moe" else [0, 1, 2])
    for layer in moe_layers:
        np.testing.assert_array_equal(got["per_expert"][str(layer)], want[layer])
    for kind in ("router", "attention", "dense"):
        assert got[kind] == {str(k): v for k, v in other[kind].items()}, kind
    assert (family == "qwen3_moe") == bool(got["dense"])  # qwen's mlp_only_layers=[1]
    # Each expert's scored size: gate, up and down matrices of the expert width.
    m = config.moe_intermediate_size or config.intermediate_size
    assert got["expert_size"]["0"] == [3 * m * config.hidden_size] * config.num_experts
    # The same counts from the sparse indices a mask directory stores.
    shapes = {n: x.shape for n, x in mask.items()}
    save_mask_indices(str(tmp_path), {n: np.flatnonzero(x) for n, x in mask.items()}, shapes, {"name": "t"})
    assert expert_counts(load_mask_indices(str(tmp_path)), config) == got


def test_concentration_share_of_top_units():
    # 2 layers x 5 experts = 10 units: the top 10% is the single largest unit.
    per_expert = {"0": [1, 9, 0, 0, 2], "1": [3, 0, 5, 0, 0]}
    c = concentration(per_expert)
    assert c == {"share": 9 / 20, "units": 10, "top_units": 1, "pruned": 20}
    # 25% of 10 units is ceil(2.5) = 3 units: 9 + 5 + 3.
    assert concentration(per_expert, top=0.25)["share"] == pytest.approx(17 / 20)
    # Against NumPy on random counts.
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(6, 16))
    share = np.sort(counts.ravel())[::-1][:10].sum() / counts.sum()
    assert concentration({str(i): list(r) for i, r in enumerate(counts)})["share"] == pytest.approx(share)
    assert concentration({"0": [0, 0]})["share"] is None


def test_dense_model_is_refused():
    config = ModelConfig.from_hf({"model_type": "llama", **BASE})
    with pytest.raises(NotMoEError, match="no experts"):
        expert_counts({}, config)
