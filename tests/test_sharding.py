"""The same numbers on one device and on a mesh of 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import harmjax
from harmjax.sharding import HOST, MeshConfig, host_tensor_size, make_mesh, tensor_groups_within_hosts
from tests.hf_reference import left_padded_batch, save_tiny, tiny_hf_model


def test_eight_devices_present():
    assert jax.device_count() == 8


@pytest.mark.parametrize("mesh_config", [MeshConfig(data=1, fsdp=2, tensor=4), MeshConfig(data=2, fsdp=4, tensor=1)])
def test_forward_on_mesh_equals_one_device(mesh_config, tmp_path):
    src = save_tiny(tiny_hf_model("llama"), tmp_path)
    one = harmjax.load(src, mesh=make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
    many = harmjax.load(src, mesh=mesh_config)
    q = many.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"]
    assert len(q.sharding.device_set) == 8
    assert not q.sharding.is_fully_replicated

    ids, mask, _ = left_padded_batch(batch=4 if mesh_config.data * mesh_config.fsdp <= 4 else 8)
    ref = np.asarray(harmjax.forward(one.params, one.config, jnp.asarray(ids), jnp.asarray(mask)))
    fn = harmjax.jit_forward(many.config, many.mesh)
    ours = fn(many.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    assert ours.sharding.spec[0] is not None  # batch stays split
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


def test_mesh_config_resolution():
    assert MeshConfig(data=-1, fsdp=2, tensor=2).shape(8) == (2, 2, 2)
    assert MeshConfig(data=1, fsdp=-1, tensor=1).shape(8) == (1, 8, 1)
    with pytest.raises(ValueError, match="needs 12 devices"):
        MeshConfig(data=3, fsdp=2, tensor=2).shape(8)
    with pytest.raises(ValueError, match="At most one"):
        MeshConfig(data=-1, fsdp=-1).shape(8)


def test_host_tensor_size_divides_heads_and_mlp():
    """tensor=HOST takes the most devices of a host that every head count and the MLP divide."""
    qwen14b = harmjax.ModelConfig(model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                                  num_layers=48, num_heads=40, num_kv_heads=8, head_dim=128)
    assert host_tensor_size(qwen14b, 8) == 8
    assert host_tensor_size(qwen14b, 2) == 2
    assert host_tensor_size(qwen14b, 16) == 8  # 8 KV heads
    assert host_tensor_size(qwen14b, 6) == 2  # 40 heads: not 6 or 3
    assert MeshConfig(data=1, fsdp=-1, tensor=HOST).resolve(qwen14b, 8) == MeshConfig(data=1, fsdp=-1, tensor=8)
    assert MeshConfig(data=1, fsdp=-1, tensor=4).resolve(qwen14b, 8).tensor == 4  # explicit sizes stay
    assert MeshConfig(data=1, fsdp=-1, tensor=HOST).shape(8) == (1, 1, 8)  # no model: all local devices
    sub = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=HOST), devices=jax.devices()[:4], model_config=qwen14b)
    assert dict(sub.shape) == {"data": 1, "fsdp": 1, "tensor": 4}  # HOST counts the devices given


def test_load_with_host_tensor_mesh(tmp_path):
    """The tiny llama (4 heads, 2 KV heads) on 8 devices of one process: tensor 2, fsdp 4, and
    the same logits as one device."""
    src = save_tiny(tiny_hf_model("llama"), tmp_path)
    model = harmjax.load(src, mesh=MeshConfig(data=1, fsdp=-1, tensor=HOST))
    assert dict(model.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert tensor_groups_within_hosts(model.mesh)
    one = harmjax.load(src, mesh=make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
    ids, mask, _ = left_padded_batch(batch=4)
    ref = np.asarray(harmjax.forward(one.params, one.config, jnp.asarray(ids), jnp.asarray(mask)))
    ours = harmjax.jit_forward(model.config, model.mesh)(model.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


def test_indivisible_dimension_is_replicated(tmp_path):
    """On tensor=8, a dimension that 8 does not divide is replicated (the prime vocabulary of
    101 rows); one that it divides is split into equal row blocks even inside a head: MQA k/v
    (1 head x head_dim 32) hold 4 rows per device. Each device holds exactly its block of the
    checkpoint tensor, and the forward pass still equals transformers'."""
    from tests.hf_reference import torch_logits

    hf_model = tiny_hf_model("gemma", vocab_size=101)
    src = save_tiny(hf_model, tmp_path)
    model = harmjax.load(src, mesh=MeshConfig(data=1, fsdp=1, tensor=8))
    c = hf_model.config
    assert (c.num_key_value_heads, c.head_dim, c.vocab_size) == (1, 32, 101)  # the case described
    hf_state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    layer = model.params["model"]["layers"]["0"]["self_attn"]
    tensor = 8
    # Expected per-device block of each weight, from the HF config alone: the output (row)
    # dimension is split 8 ways when 8 divides it; the hidden (fsdp) dimension stays whole.
    expected_rows = {
        "model.embed_tokens.weight": (model.params["model"]["embed_tokens"]["weight"], c.vocab_size),
        "model.layers.0.self_attn.q_proj.weight": (layer["q_proj"]["weight"], c.num_attention_heads * c.head_dim),
        "model.layers.0.self_attn.k_proj.weight": (layer["k_proj"]["weight"], c.num_key_value_heads * c.head_dim),
        "model.layers.0.self_attn.v_proj.weight": (layer["v_proj"]["weight"], c.num_key_value_heads * c.head_dim),
    }
    for name, (array, rows) in expected_rows.items():
        block = rows // tensor if rows % tensor == 0 else rows
        shards = array.addressable_shards
        assert len(shards) == tensor, name
        starts = set()
        for shard in shards:
            assert shard.data.shape == (block, c.hidden_size), (name, shard.data.shape)
            # The block a device holds is the checkpoint's rows at that device's index.
            np.testing.assert_array_equal(np.asarray(shard.data), hf_state[name][shard.index], err_msg=name)
            starts.add(shard.index[0].start or 0)
        # Split: 8 distinct row blocks covering the tensor; replicated: every device from row 0.
        assert starts == (set(range(0, rows, block)) if block < rows else {0}), (name, starts)
    assert model.params["model"]["embed_tokens"]["weight"].sharding.is_fully_replicated  # 101 is prime
    assert not layer["k_proj"]["weight"].sharding.is_fully_replicated

    ids, mask, positions = left_padded_batch()
    ref = torch_logits(hf_model, ids, mask, positions)
    ours = np.asarray(harmjax.jit_forward(model.config, model.mesh)(
        model.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    valid = mask.astype(bool)
    # The tolerance of tests/test_parity.py: 1e-4 of the logits' spread.
    assert np.abs(ours - ref)[valid].max() <= 1e-4 * ref[valid].std()


def test_loading_reads_only_each_devices_slice(tmp_path, monkeypatch):
    """On an (fsdp x tensor) mesh no tensor that can be split is read whole from disk."""
    from harmjax.io.safetensors_io import TensorReader

    src = save_tiny(tiny_hf_model("llama"), tmp_path)
    reads = []
    original = TensorReader.read

    def spy(self, name, index=None, dtype=None):
        out = original(self, name, index, dtype)
        reads.append((name, out.size, int(np.prod(self.shape(name)))))
        return out

    monkeypatch.setattr(TensorReader, "read", spy)
    harmjax.load(src, mesh=MeshConfig(data=1, fsdp=2, tensor=4))
    q_reads = [(size, full) for name, size, full in reads if name.endswith("q_proj.weight")]
    assert q_reads and all(size * 8 == full for size, full in q_reads)
