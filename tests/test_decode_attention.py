"""The flash-decoding kernel (GPU at run time) equals the XLA attention path; here the kernel
runs in Pallas' interpreter on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harmjax.model import layers
from harmjax.model.decode_attention import KernelConfig, kernel_applicable, pallas_decode_attention, valid_range


def _random_qkv(seed, b, kv, g, d, slots, dtype):
    """One decode query (b, 1, kv*g, d) and a (b, kv, slots, d) key and value cache."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, 1, kv * g, d)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((b, kv, slots, d)), dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize(
    "config",
    [
        KernelConfig(block_k=64, split=None),
        KernelConfig(block_k=32, split=128),
        KernelConfig(block_k=16, split=64),
        KernelConfig(block_k=32, split=None, mma=False),
        KernelConfig(block_k=16, split=128, mma=False),
    ],
    ids=["whole-row", "split128", "split64", "reduce-whole-row", "reduce-split128"],
)
def test_kernel_equals_xla_attention(dtype, tol, config):
    b, kv, g, d, slots = 4, 2, 4, 32, 256
    q, k, v = _random_qkv(0, b, kv, g, d, slots, dtype)
    # Left padding and causal prefixes that start and end inside blocks and splits, a row
    # cut by a sliding window, and a row reaching the last slot.
    key_valid = np.zeros((b, slots), bool)
    key_valid[0, :70] = True
    key_valid[1, 9:200] = True
    key_valid[2, 130:146] = True
    key_valid[3, 3:256] = True
    mask = jnp.asarray(key_valid[:, None, :])
    start, end = valid_range(mask)
    np.testing.assert_array_equal(np.asarray(start), [0, 9, 130, 3])
    np.testing.assert_array_equal(np.asarray(end), [70, 200, 146, 256])
    ref = layers.attention(q, k, v, mask, 0.125, kv_heads_first=True)  # the XLA path on CPU
    out = pallas_decode_attention(q, k, v, mask, 0.125, config, interpret=True)
    assert out.dtype == dtype and out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("mma", [True, False])
def test_kernel_pads_an_odd_number_of_query_heads(mma):
    """3 query heads per KV head (SmolLM2-135M's 9 over 3): padded to the tile and cut back."""
    b, kv, g, d, slots = 2, 3, 3, 64, 128
    q, k, v = _random_qkv(1, b, kv, g, d, slots, jnp.float32)
    key_valid = np.zeros((b, slots), bool)
    key_valid[0, 5:100] = True
    key_valid[1, :128] = True
    mask = jnp.asarray(key_valid[:, None, :])
    ref = layers.attention(q, k, v, mask, d**-0.5, kv_heads_first=True)
    out = pallas_decode_attention(q, k, v, mask, d**-0.5, KernelConfig(block_k=32, mma=mma), interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_kernel_applicability_rules(monkeypatch):
    """Off the GPU never; on a (pretended) single GPU only for the shapes and dtypes the
    kernel handles, and never when HARMJAX_DECODE_KERNEL=0."""
    q = jnp.zeros((1, 1, 8, 64), jnp.bfloat16)
    k = jnp.zeros((1, 2, 128, 64), jnp.bfloat16)
    assert not kernel_applicable(q, k, None)  # the CPU backend
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert kernel_applicable(q, k, None)
    assert not kernel_applicable(q, k, 50.0)  # soft-capped logits
    assert not kernel_applicable(q.astype(jnp.float32), k.astype(jnp.float32), None)
    assert not kernel_applicable(jnp.zeros((1, 2, 8, 64), jnp.bfloat16), k, None)  # two query tokens
    assert not kernel_applicable(q, jnp.zeros((1, 2, 96, 64), jnp.bfloat16), None)  # 96 % 64 slots
    assert not kernel_applicable(jnp.zeros((1, 1, 34, 64), jnp.bfloat16), k, None)  # 17 heads per group
    monkeypatch.setenv("HARMJAX_DECODE_KERNEL", "0")
    assert not kernel_applicable(q, k, None)


def test_kernel_runs_per_shard_under_a_context_mesh(monkeypatch):
    """On 8 devices (data 2 x fsdp 2 x tensor 2) the kernel runs under shard_map, rows split
    over the batch axes and KV heads over tensor, and equals the XLA path; the applicability
    check accepts the mesh only when the batch and KV heads divide it."""
    from harmjax.sharding import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    b, kv, g, d, slots = 8, 4, 2, 32, 128
    q, k, v = _random_qkv(2, b, kv, g, d, slots, jnp.float32)
    key_valid = np.zeros((b, slots), bool)
    for row in range(b):
        key_valid[row, row * 7 : 60 + row * 8] = True
    mask = jnp.asarray(key_valid[:, None, :])
    ref = layers.attention(q, k, v, mask, d**-0.5, kv_heads_first=True)
    attend = jax.jit(lambda *a: pallas_decode_attention(*a, d**-0.5, KernelConfig(block_k=32), interpret=True))
    with jax.set_mesh(mesh):
        out = attend(q, k, v, mask)
        hlo = attend.lower(q, k, v, mask).as_text()
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert "sdy.manual_computation" in hlo  # the shard_map region

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    qb, kb = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    assert not kernel_applicable(qb, kb, None)  # 8 devices and no context mesh
    with jax.set_mesh(mesh):
        assert kernel_applicable(qb, kb, None)
        assert not kernel_applicable(qb[:6], kb[:6], None)  # batch 6 over 4 batch shards
        assert not kernel_applicable(qb[:, :, :6], kb[:, :3], None)  # 3 KV heads over tensor 2
