"""The decoder's building blocks as pure functions: norms, RoPE, attention, MLP.

Numerics follow transformers' PyTorch implementations: norms and softmax in float32, RoPE
tables computed in float32 and cast to the activation dtype, matmuls in the parameter
dtype with float32 accumulation for attention scores.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from harmjax.config import RopeConfig

# A large finite negative rather than -inf, so that masking can never produce NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """`x @ weight.T + bias` with HF's (out_features, in_features) weight orientation.

    `weight` may also be an object with a `linear(x)` method (a weight that carries its own
    differentiation rule, e.g. attribution's probed weights); the model stays unaware of why.
    """
    if hasattr(weight, "linear"):
        y = weight.linear(x)
    else:
        y = jnp.einsum("...i,oi->...o", x, weight)
    return y if bias is None else y + bias


def rms_norm(
    x: jax.Array,
    weight: jax.Array,
    eps: float,
    offset: float = 0.0,
    scale_in_fp32: bool = False,
) -> jax.Array:
    """RMSNorm over the last axis, computed in float32.

    `offset=1` applies the scale as `1 + weight` (Gemma). `scale_in_fp32` multiplies by the
    weight before casting back (Gemma, OLMo); otherwise after (Llama, Qwen, Mistral).
    """
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if scale_in_fp32:
        return (xf * (offset + weight.astype(jnp.float32))).astype(dtype)
    scale = weight + jnp.asarray(offset, weight.dtype) if offset else weight
    return scale * xf.astype(dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies (float32, head_dim // 2) and the cos/sin scaling of a RoPE variant.

    Mirrors transformers' `ROPE_INIT_FUNCTIONS` for default, linear, llama3 and yarn.
    """
    dim = head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    scaling = 1.0
    if rope.rope_type == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    elif rope.rope_type == "yarn":
        inv_freq, scaling = _yarn(rope, dim, max_position_embeddings)
    return inv_freq.astype(np.float32), float(scaling)


def _yarn(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    original = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor else max_position_embeddings / original

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    pos_freqs = np.float32(rope.theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (factor * pos_freqs)
    inv_freq = inv_interpolation * (1 - extrapolation_factor) + inv_extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32), attention_factor


def rope_tables(
    positions: jax.Array, inv_freq: np.ndarray, scaling: float, dtype
) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables, (batch, seq, head_dim), for integer positions (batch, seq)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scaling).astype(dtype), (jnp.sin(emb) * scaling).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x (batch, seq, heads, head_dim) with HF's rotate-half convention.

    Tables narrower than head_dim (partial rotary, Phi-4-mini) rotate the first
    `cos.shape[-1]` dimensions of each head and pass the rest through unchanged.
    """
    if cos.shape[-1] < x.shape[-1]:
        rot = cos.shape[-1]
        return jnp.concatenate([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], axis=-1)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention_mask(
    key_valid: jax.Array, query_len: int, sliding_window: int | None, query_offset: int = 0
) -> jax.Array:
    """Boolean (batch, query, key) visibility: causal, key padding and optional sliding window.

    Indices are array positions, as in transformers' masks; with left padding the real tokens
    are contiguous, so index distance equals position distance. Real queries never see
    padding keys; a padding query sees only itself.
    """
    key_len = key_valid.shape[-1]
    q_idx = jnp.arange(query_len)[:, None] + query_offset
    k_idx = jnp.arange(key_len)[None, :]
    visible = k_idx <= q_idx
    if sliding_window is not None:
        visible = visible & (k_idx > q_idx - sliding_window)
    visible = visible[None, :, :] & key_valid[:, None, :].astype(bool)
    # A padding query sees only itself: its row is never empty (no NaN, no uniform average
    # over real tokens), and nothing flows from real tokens into padding positions.
    return visible | (k_idx == q_idx)[None, :, :]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    softcap: float | None = None,
    kv_heads_first: bool = False,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Grouped-query attention.

    q: (batch, seq, heads, head_dim); k, v: (batch, keys, kv_heads, head_dim), or
    (batch, kv_heads, keys, head_dim) with `kv_heads_first` (the KV cache's layout, in which
    (batch, kv_heads) are leading batch dimensions of the matmuls, so a long cache is read
    in place rather than transposed at every decode step);
    mask: (batch, seq, keys) bool; sinks: optional per-head logits (heads,) that join each
    softmax and are then dropped (gpt-oss). Returns (batch, seq, heads * head_dim).
    """
    if kv_heads_first and sinks is None:
        from harmjax.model import decode_attention

        if decode_attention.kernel_applicable(q, k, softcap):
            interpret = decode_attention.mode() == "interpret"
            return decode_attention.pallas_decode_attention(q, k, v, mask, scale, interpret=interpret)
    b, t, h, d = q.shape
    kv_heads = k.shape[1] if kv_heads_first else k.shape[2]
    kv = "bksd" if kv_heads_first else "bskd"
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum(f"btkgd,{kv}->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    else:
        sink = jnp.broadcast_to(
            sinks.astype(jnp.float32).reshape(1, kv_heads, h // kv_heads, 1, 1), scores.shape[:-1] + (1,)
        )
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1].astype(v.dtype)
    out = jnp.einsum(f"bkgts,{kv}->btkgd", probs, v)
    return out.reshape(b, t, h * d)


def activation(name: str, x: jax.Array) -> jax.Array:
    """The MLP activation by harmjax name (silu, gelu_tanh, gelu)."""
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    raise ValueError(f"Unknown activation {name!r}.")
