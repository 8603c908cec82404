"""The flash-decoding kernel (GPU at run time) equals the XLA attention path; here the kernel
runs in Pallas' interpreter on the CPU."""

import jax.numpy as jnp
import numpy as np
import pytest

from harmjax.model import layers
from harmjax.model.decode_attention import pallas_decode_attention, valid_range


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_kernel_equals_xla_attention(dtype, tol):
    b, kv, g, d, slots = 4, 2, 4, 32, 256
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, 1, kv * g, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, kv, slots, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, kv, slots, d)), dtype)
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
    out = pallas_decode_attention(q, k, v, mask, 0.125, interpret=True)
    assert out.dtype == dtype and out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
