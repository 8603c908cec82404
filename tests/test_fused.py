"""Fused q/k/v and gate/up projections (harmjax.model.fused): the fused tree gives
transformers' logits for every family, and fusion is only done where it is valid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import harmjax
from harmjax.attribution.probes import ProbedWeight
from harmjax.model import fused
from harmjax.sharding import MeshConfig, make_mesh
from tests.hf_reference import FAMILIES, left_padded_batch, save_tiny, tiny_hf_model, torch_logits
from tests.test_parity import assert_logits_match


# Phi-3 is stored fused (its params already are what this test builds); parity covers it.
@pytest.mark.parametrize("family", [f for f in sorted(FAMILIES) if f != "phi3"])
def test_fused_logits_match_transformers(family, tmp_path):
    hf_model = tiny_hf_model(family)
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    model = harmjax.load(save_tiny(hf_model, tmp_path), dtype="float32", mesh=mesh)
    params = fused.fuse_projections(model.params, model.config, mesh)
    for layer in params["model"]["layers"].values():
        assert set(layer["self_attn"]) >= {"qkv_proj", "o_proj"} and "q_proj" not in layer["self_attn"]
        assert set(layer["mlp"]) == {"gate_up_proj", "down_proj"}
    assert "q_proj" in model.params["model"]["layers"]["0"]["self_attn"]  # input untouched
    ids, mask, positions = left_padded_batch()
    ours = np.asarray(harmjax.forward(params, model.config, jnp.asarray(ids), jnp.asarray(mask)))
    assert_logits_match(ours, torch_logits(hf_model, ids, mask, positions), mask)


def test_fusion_rules(tmp_path):
    """Fused only for plain arrays on meshes without tensor parallelism; `auto` needs memory
    statistics (the CPU has none); a sharded mesh keeps the fused weights sharded."""
    hf_model = tiny_hf_model("llama")
    path = save_tiny(hf_model, tmp_path)
    one = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    model = harmjax.load(path, dtype="float32", mesh=one)
    assert fused.fusible(model.params, model.config, one)
    assert fused.should_fuse(model.params, model.config, one, True)
    assert not fused.should_fuse(model.params, model.config, one, False)
    assert not fused.should_fuse(model.params, model.config, one, "auto")  # CPU: no memory stats
    with pytest.raises(ValueError, match="fuse_projections must be"):
        fused.should_fuse(model.params, model.config, one, "yes")

    probed = jax.tree.map(lambda x: x, model.params)
    w = probed["model"]["layers"]["1"]["self_attn"]["k_proj"]["weight"]
    probed["model"]["layers"]["1"]["self_attn"]["k_proj"]["weight"] = ProbedWeight(w, jnp.zeros(w.shape, jnp.float32), "signed")
    assert not fused.fusible(probed, model.config, one)

    tensor = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert not fused.fusible(harmjax.load(path, dtype="float32", mesh=tensor).params, model.config, tensor)

    fsdp = make_mesh(MeshConfig(data=2, fsdp=4))
    sharded = harmjax.load(path, dtype="float32", mesh=fsdp)
    out = fused.fuse_projections(sharded.params, sharded.config, fsdp)
    qkv = out["model"]["layers"]["0"]["self_attn"]["qkv_proj"]["weight"]
    q = sharded.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"]
    assert qkv.sharding.spec == q.sharding.spec
    ids, mask, _ = left_padded_batch()
    a = harmjax.forward(sharded.params, sharded.config, jnp.asarray(ids), jnp.asarray(mask))
    b = harmjax.forward(out, sharded.config, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
