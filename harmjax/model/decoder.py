"""One decoder for every supported family, as pure functions over the params pytree.

`forward(params, config, input_ids, attention_mask)` returns float32 logits. The params are
the nested dict described in `param_specs` (HF names, HF orientation), so any tree with the
same structure (a mask, a score) lines up with the weights used here. Families differ only
through `ModelConfig` flags.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from harmjax.config import ModelConfig
from harmjax.model import layers

Params = dict[str, Any]


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions 0, 1, ... counted over real tokens only, so left padding does not shift them."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _norm(config: ModelConfig, x: jax.Array, p: Params) -> jax.Array:
    return layers.rms_norm(
        x, p["weight"], config.rms_norm_eps, config.norm_offset, config.norm_scale_in_fp32
    )


def _proj(p: Params, x: jax.Array) -> jax.Array:
    return layers.linear(x, p["weight"], p.get("bias"))


def attention_block(
    p: Params, config: ModelConfig, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array
) -> jax.Array:
    """Self-attention of one block: projections, optional q/k norm, RoPE, GQA, output projection."""
    c = config
    b, t, _ = x.shape
    q, k, v = _proj(p["q_proj"], x), _proj(p["k_proj"], x), _proj(p["v_proj"], x)
    if c.qk_norm == "full":  # OLMo-2/3 normalise across all heads at once.
        q, k = _norm(c, q, p["q_norm"]), _norm(c, k, p["k_norm"])
    q = q.reshape(b, t, c.num_heads, c.head_dim)
    k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm == "head":  # Qwen3 normalises each head.
        q, k = _norm(c, q, p["q_norm"]), _norm(c, k, p["k_norm"])
    cos, sin = rope
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    out = layers.attention(q, k, v, mask, c.attn_scale, c.attn_logit_softcap)
    return _proj(p["o_proj"], out)


def mlp_block(p: Params, config: ModelConfig, x: jax.Array) -> jax.Array:
    """Gated MLP: down(act(gate(x)) * up(x))."""
    gate = layers.activation(config.activation, _proj(p["gate_proj"], x))
    return _proj(p["down_proj"], gate * _proj(p["up_proj"], x))


def decoder_layer(
    p: Params, config: ModelConfig, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array
) -> jax.Array:
    """One residual block in the family's norm placement (pre, post or sandwich)."""
    c = config
    if c.norm_style == "pre":
        x = x + attention_block(p["self_attn"], c, _norm(c, x, p["input_layernorm"]), rope, mask)
        return x + mlp_block(p["mlp"], c, _norm(c, x, p["post_attention_layernorm"]))
    if c.norm_style == "post":
        x = x + _norm(c, attention_block(p["self_attn"], c, x, rope, mask), p["post_attention_layernorm"])
        return x + _norm(c, mlp_block(p["mlp"], c, x), p["post_feedforward_layernorm"])
    # sandwich (Gemma-2): norms on both sides of each sub-block.
    h = attention_block(p["self_attn"], c, _norm(c, x, p["input_layernorm"]), rope, mask)
    x = x + _norm(c, h, p["post_attention_layernorm"])
    h = mlp_block(p["mlp"], c, _norm(c, x, p["pre_feedforward_layernorm"]))
    return x + _norm(c, h, p["post_feedforward_layernorm"])


def embed(params: Params, config: ModelConfig, input_ids: jax.Array) -> jax.Array:
    """Token embeddings, scaled by sqrt(hidden_size) in Gemma families."""
    table = params["model"]["embed_tokens"]["weight"]
    h = jnp.take(table, input_ids, axis=0)
    if config.embed_scale:
        # transformers rounds the scale to the activation dtype first; so do we.
        h = h * jnp.asarray(config.hidden_size**0.5, dtype=h.dtype)
    return h


def hidden_states(
    params: Params,
    config: ModelConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    *,
    remat: bool = False,
) -> jax.Array:
    """Final-norm hidden states (batch, seq, hidden) in the parameter dtype."""
    c = config
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if positions is None:
        positions = default_positions(attention_mask)
    x = embed(params, c, input_ids)
    seq = input_ids.shape[1]

    ropes, masks = {}, {}
    for kind in set(c.layer_types):
        rope_cfg = c.rope if kind == "full" else c.rope_local
        inv_freq, scaling = layers.rope_inv_freq(rope_cfg, c.head_dim, c.max_position_embeddings)
        ropes[kind] = layers.rope_tables(positions, inv_freq, scaling, x.dtype)
        window = c.sliding_window if kind == "sliding" else None
        masks[kind] = layers.attention_mask(attention_mask, seq, window)

    layer_fn = decoder_layer
    if remat:
        # Recompute each block's activations in the backward pass: memory O(layers) smaller.
        layer_fn = jax.checkpoint(decoder_layer, static_argnums=(1,))
    blocks = params["model"]["layers"]
    for i, kind in enumerate(c.layer_types):
        with jax.named_scope(f"layer_{i}"):
            x = layer_fn(blocks[str(i)], c, x, ropes[kind], masks[kind])
    return _norm(c, x, params["model"]["norm"])


def logits_from_hidden(params: Params, config: ModelConfig, h: jax.Array) -> jax.Array:
    """float32 logits from final hidden states (tied or untied head, optional soft-cap)."""
    head = (
        params["model"]["embed_tokens"]["weight"]
        if config.tie_word_embeddings
        else params["lm_head"]["weight"]
    )
    logits = jnp.einsum("...i,vi->...v", h, head, preferred_element_type=jnp.float32)
    if config.final_logit_softcap:
        cap = config.final_logit_softcap
        logits = jnp.tanh(logits / cap) * cap
    return logits


def forward(
    params: Params,
    config: ModelConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    *,
    remat: bool = False,
) -> jax.Array:
    """Causal-LM logits, float32 (batch, seq, vocab), for left- or right-padded batches.

    Args:
      params: the params pytree (HF names and orientation).
      config: the model's `ModelConfig` (static under jit).
      input_ids: int (batch, seq).
      attention_mask: 1 for real tokens, 0 for padding; defaults to all ones.
      positions: RoPE positions; by default counted over real tokens, so a left-padded row
        gives the same logits as the unpadded sequence.
      remat: rematerialise each block in the backward pass.
    """
    h = hidden_states(params, config, input_ids, attention_mask, positions, remat=remat)
    return logits_from_hidden(params, config, h)
