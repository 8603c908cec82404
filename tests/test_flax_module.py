"""`harmjax.FlaxDecoder`: a linen module whose variables are harmjax's params tree, equal to
`harmjax.forward` bit for bit on every family, and to transformers' forward."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import harmjax
from harmjax.model.param_specs import param_specs
from harmjax.sharding import MeshConfig, make_mesh
from harmjax.tree import flatten
from tests.hf_reference import FAMILIES, left_padded_batch, save_tiny, tiny_hf_model, torch_logits


def _one_device():
    return make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_apply_equals_forward_and_transformers(family, tmp_path):
    hf_model = tiny_hf_model(family)
    model = harmjax.load(save_tiny(hf_model, tmp_path), dtype="float32", mesh=_one_device())
    module, variables = harmjax.FlaxDecoder.from_model(model)
    ids, mask, positions = left_padded_batch()
    ours = jax.jit(module.apply)(variables, jnp.asarray(ids), jnp.asarray(mask))
    plain = jax.jit(harmjax.forward, static_argnums=1)(model.params, model.config, jnp.asarray(ids), jnp.asarray(mask))
    chex.assert_trees_all_equal(ours, plain)  # one decoder: bit for bit
    ref = torch_logits(hf_model, ids, mask, positions)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], ref[valid], atol=1e-4 * ref[valid].std(), rtol=0)


def test_variables_are_the_model_params_without_copy(tmp_path):
    model = harmjax.load(save_tiny(tiny_hf_model("llama"), tmp_path), dtype="float32", mesh=_one_device())
    module, variables = harmjax.FlaxDecoder.from_model(model)
    assert variables["params"] is model.params
    back = harmjax.model.flax_module.variables_to_model(model, variables)
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(model.params)):
        assert a is b


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2", "olmo2"])
def test_init_has_the_param_specs_structure(family, tmp_path):
    loaded = harmjax.load(save_tiny(tiny_hf_model(family), tmp_path), dtype="float32", mesh=_one_device())
    config = loaded.config
    module = harmjax.FlaxDecoder(config, param_dtype=jnp.bfloat16)
    ids = jnp.ones((1, 4), jnp.int32)
    variables = module.init(jax.random.key(0), ids)
    assert list(variables) == ["params"]
    flat = flatten(variables["params"])
    specs = param_specs(config)
    assert sorted(flat) == sorted(specs)
    assert list(flat) == list(flatten(loaded.params))  # the very tree a loaded model has
    for name, spec in specs.items():
        chex.assert_shape(flat[name], spec.shape)
        assert flat[name].dtype == jnp.bfloat16
    chex.assert_tree_all_finite(variables)
    # Norms start at the identity, biases at zero, matrices random.
    norm = flat["model.norm.weight"].astype(jnp.float32)
    np.testing.assert_array_equal(norm, np.full(norm.shape, 1.0 - config.norm_offset))
    assert float(jnp.std(flat["model.layers.0.mlp.up_proj.weight"].astype(jnp.float32))) > 0.01
    # The module's own params run through the functional decoder unchanged.
    chex.assert_trees_all_equal(module.apply(variables, ids), harmjax.forward(variables["params"], config, ids))


def test_shardings_match_param_shardings(tmp_path):
    config = harmjax.load(save_tiny(tiny_hf_model("llama"), tmp_path), dtype="float32", mesh=_one_device()).config
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), devices=jax.devices()[:4])
    sh = harmjax.FlaxDecoder(config).shardings(mesh)
    assert sh["params"]["model"]["layers"]["0"]["mlp"]["up_proj"]["weight"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_nnx_bridge_wraps_the_module(tmp_path):
    """NNX users wrap the linen module with flax.nnx.bridge; its state is the params tree."""
    from flax import nnx
    from flax.nnx import bridge

    model = harmjax.load(save_tiny(tiny_hf_model("qwen2"), tmp_path), dtype="float32", mesh=_one_device())
    ids = jnp.asarray(left_padded_batch()[0])
    wrapped = bridge.ToNNX(harmjax.FlaxDecoder(model.config), rngs=nnx.Rngs(0))
    bridge.lazy_init(wrapped, ids)
    state = nnx.state(wrapped, nnx.Param)
    assert sorted(flatten(nnx.to_pure_dict(state))) == sorted(flatten(model.params))
    nnx.replace_by_pure_dict(state, model.params)  # the loaded weights
    nnx.update(wrapped, state)
    chex.assert_trees_all_equal(wrapped(ids), harmjax.forward(model.params, model.config, ids))
