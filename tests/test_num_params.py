"""`harmjax.model.param_specs.num_params` against transformers' own parameter count of the
same tiny model, for every supported family (biases, q/k norms, sandwich and post norms,
tied and untied embeddings)."""

import pytest

from harmjax.config import ModelConfig
from harmjax.model.param_specs import num_params
from tests.hf_reference import FAMILIES, tiny_hf_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_num_params_equals_transformers_count(family):
    model = tiny_hf_model(family)
    # parameters() yields a tied embedding once, as num_params counts it.
    want = sum(p.numel() for p in model.parameters())
    assert num_params(ModelConfig.from_hf(model.config)) == want


def test_num_params_counts_every_bias():
    """qwen2's q/k/v biases without an o bias, and llama with attention and MLP biases."""
    for family, overrides in [("qwen2", {}), ("llama", {"attention_bias": True, "mlp_bias": True}),
                              ("llama", {"attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True})]:
        model = tiny_hf_model(family, **overrides)
        assert num_params(ModelConfig.from_hf(model.config)) == sum(p.numel() for p in model.parameters()), \
            (family, overrides)
