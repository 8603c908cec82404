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
from harmjax.model import layers, moe, rope_variants
from harmjax.model.residual import ResidualEdit, ablated, add_at_block, project_out

Params = dict[str, Any]
# Optional KV cache of one decoder block: {"k": ..., "v": ...}, each (batch, kv_heads,
# cache_len, head_dim) in the activation dtype. The whole cache maps layer keys "0".."N-1"
# to these (see `harmjax.generate.kv_cache`).
LayerCache = dict[str, jax.Array]


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
    p: Params,
    config: ModelConfig,
    x: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    mask: jax.Array,
    cache: LayerCache | None = None,
    cache_index: jax.Array | int | None = None,
):
    """Self-attention of one block: projections, optional q/k norm, RoPE, GQA, output projection.

    Without `cache` returns the block output. With `cache` (this block's {"k", "v"}), the new
    tokens' keys and values are written into cache slots [cache_index, cache_index + seq),
    attention runs over the whole cache (`mask` is then (batch, seq, cache_len)) and the
    result is `(output, updated_cache)`.
    """
    c = config
    b, t, _ = x.shape
    if "qkv_proj" in p:  # fused for inference (harmjax.model.fused)
        nq, nkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q, k, v = jnp.split(_proj(p["qkv_proj"], x), [nq, nq + nkv], axis=-1)
    else:
        q, k, v = _proj(p["q_proj"], x), _proj(p["k_proj"], x), _proj(p["v_proj"], x)
    if c.qk_norm == "full":  # OLMo-2/3 normalise across all heads at once.
        q, k = _norm(c, q, p["q_norm"]), _norm(c, k, p["k_norm"])
    q = q.reshape(b, t, c.num_heads, c.head_dim)
    k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm == "head":  # Qwen3 normalises each head.
        q, k = _norm(c, q, p["q_norm"]), _norm(c, k, p["k_norm"])
    if rope is not None:  # None in layers without RoPE (SmolLM3's NoPE layers)
        cos, sin = rope
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    sinks = p.get("sinks")  # gpt-oss' per-head sink logits
    if cache is None:
        out = layers.attention(q, k, v, mask, c.attn_scale, c.attn_logit_softcap, sinks=sinks)
        return _proj(p["o_proj"], out)
    # In-place slot update: inside a jitted loop over a donated cache this writes `seq`
    # rows per step rather than copying the cache. Only the new rows are transposed into
    # the cache's (batch, kv_heads, slots, head_dim) layout.
    zero = jnp.zeros((), jnp.int32)
    start = (zero, zero, jnp.asarray(cache_index, jnp.int32), zero)
    k_all = jax.lax.dynamic_update_slice(cache["k"], k.swapaxes(1, 2).astype(cache["k"].dtype), start)
    v_all = jax.lax.dynamic_update_slice(cache["v"], v.swapaxes(1, 2).astype(cache["v"].dtype), start)
    out = layers.attention(
        q, k_all, v_all, mask, c.attn_scale, c.attn_logit_softcap, kv_heads_first=True, sinks=sinks
    )
    return _proj(p["o_proj"], out), {"k": k_all, "v": v_all}


def feed_forward(p: Params, config: ModelConfig, x: jax.Array) -> jax.Array:
    """The feed-forward of a block with layer params `p`: the MoE block (`harmjax.model.moe`)
    where the layer has experts, else the gated MLP."""
    key = moe.ffn_key(config)
    if config.num_experts and key in p and "experts" in p[key]:
        return moe.moe_block(p[key], config, x)
    return mlp_block(p["mlp"], config, x)


def mlp_block(p: Params, config: ModelConfig, x: jax.Array) -> jax.Array:
    """Gated MLP: down(act(gate(x)) * up(x))."""
    if "gate_up_proj" in p:  # fused for inference (harmjax.model.fused)
        gate, up = jnp.split(_proj(p["gate_up_proj"], x), 2, axis=-1)
    else:
        gate, up = _proj(p["gate_proj"], x), _proj(p["up_proj"], x)
    return _proj(p["down_proj"], layers.activation(config.activation, gate) * up)


def decoder_layer(
    p: Params, config: ModelConfig, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array,
    cache: LayerCache | None = None, cache_index: jax.Array | int | None = None,
    ablate: jax.Array | None = None,
):
    """One residual block in the family's norm placement (pre, post or sandwich).

    Returns the block output, or `(output, updated_cache)` when this block's KV `cache` is
    given (see `attention_block`). `ablate` (a unit vector) is projected out of the residual
    stream after each sub-block's residual add (see `harmjax.model.residual`).
    """
    c = config
    new_cache = None

    def attend(h):
        nonlocal new_cache
        if cache is None:
            return attention_block(p["self_attn"], c, h, rope, mask)
        out, new_cache = attention_block(p["self_attn"], c, h, rope, mask, cache, cache_index)
        return out

    if c.norm_style == "pre":
        x = project_out(x + attend(_norm(c, x, p["input_layernorm"])), ablate)
        x = x + feed_forward(p, c, _norm(c, x, p["post_attention_layernorm"]))
    elif c.norm_style == "post":
        x = project_out(x + _norm(c, attend(x), p["post_attention_layernorm"]), ablate)
        x = x + _norm(c, feed_forward(p, c, x), p["post_feedforward_layernorm"])
    else:  # sandwich (Gemma-2): norms on both sides of each sub-block.
        h = attend(_norm(c, x, p["input_layernorm"]))
        x = project_out(x + _norm(c, h, p["post_attention_layernorm"]), ablate)
        h = feed_forward(p, c, _norm(c, x, p["pre_feedforward_layernorm"]))
        x = x + _norm(c, h, p["post_feedforward_layernorm"])
    x = project_out(x, ablate)
    return x if cache is None else (x, new_cache)


def embed(params: Params, config: ModelConfig, input_ids: jax.Array) -> jax.Array:
    """Token embeddings, scaled by sqrt(hidden_size) in Gemma families."""
    table = params["model"]["embed_tokens"]["weight"]
    h = jnp.take(table, input_ids, axis=0)
    if config.embed_scale:
        # transformers rounds the scale to the activation dtype first; so do we.
        h = h * jnp.asarray(config.hidden_size**0.5, dtype=h.dtype)
    return h


def block_tables(
    config: ModelConfig,
    positions: jax.Array,
    attention_mask: jax.Array,
    seq: int,
    dtype,
    cache_index: jax.Array | int = 0,
) -> tuple[dict[str, tuple[jax.Array, jax.Array]], dict[str, jax.Array]]:
    """Per layer kind ("full", "sliding"): the RoPE (cos, sin) tables and the attention mask
    that every block of that kind uses, computed once per forward pass."""
    c = config
    ropes, masks = {}, {}
    for kind in set(c.layer_types):
        rope_cfg = c.rope if kind == "full" else c.rope_local
        ropes[kind] = rope_variants.rope_tables(rope_cfg, c.head_dim, c.max_position_embeddings, positions, dtype)
        window = c.sliding_window if kind == "sliding" else None
        masks[kind] = layers.attention_mask(attention_mask, seq, window, cache_index)
    return ropes, masks


def layer_rope(config: ModelConfig, ropes: dict[str, tuple[jax.Array, jax.Array]], index: int):
    """The RoPE tables block `index` uses (from `block_tables`), or None in a NoPE layer."""
    return None if index in config.nope_layers else ropes[config.layer_types[index]]


def final_norm(params: Params, config: ModelConfig, x: jax.Array) -> jax.Array:
    """The model's last norm, applied to the last block's output."""
    return _norm(config, x, params["model"]["norm"])


def hidden_states(
    params: Params,
    config: ModelConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    *,
    remat: bool = False,
    kv_cache: dict[str, LayerCache] | None = None,
    cache_index: jax.Array | int | None = None,
    block_masks: dict[str, jax.Array] | None = None,
    residual_edit: ResidualEdit | None = None,
    return_residuals: bool = False,
):
    """Final-norm hidden states (batch, seq, hidden) in the parameter dtype.

    `block_masks` (layer kind "full"/"sliding" -> bool (batch, seq, seq)) replaces the causal
    masks built from `attention_mask`, for custom attention patterns (the number judge's tree
    attention); give `positions` with it.

    With `kv_cache` (layer key -> {"k", "v"} of shape (batch, kv_heads, cache_len,
    head_dim)) the `seq` new tokens occupy cache slots [cache_index, cache_index + seq) and
    attend to every earlier slot; `attention_mask` is then the (batch, cache_len) validity
    of the cache slots (0 for left padding), `positions` default to real-token counts over
    those slots, and the result is `(hidden, updated_cache)`.

    `residual_edit` (`harmjax.model.residual.ResidualEdit`) ablates a direction from, or adds
    vectors to, the residual stream as the blocks run. `return_residuals` appends to the
    result a list of num_layers + 1 (batch, seq, hidden) arrays: the input of each block
    (after any edit) and the last block's output before the final norm.
    """
    c = config
    seq = input_ids.shape[1]
    cached = kv_cache is not None
    if cached and cache_index is None:
        raise ValueError("hidden_states: kv_cache is given but cache_index is not.")
    if attention_mask is None:
        key_len = next(iter(kv_cache.values()))["k"].shape[2] if cached else seq
        attention_mask = jnp.ones((input_ids.shape[0], key_len), jnp.int32)
    if positions is None:
        positions = default_positions(attention_mask)
        if cached:
            positions = jax.lax.dynamic_slice_in_dim(positions, cache_index, seq, axis=1)
    x = project_out(embed(params, c, input_ids), ablated(residual_edit))
    ropes, masks = block_tables(c, positions, attention_mask, seq, x.dtype, cache_index if cached else 0)
    if block_masks is not None:
        masks = block_masks

    layer_fn = decoder_layer
    if remat:
        # Recompute each block's activations in the backward pass: memory O(layers) smaller.
        layer_fn = jax.checkpoint(decoder_layer, static_argnums=(1,))
    blocks = params["model"]["layers"]
    new_cache, residuals = {}, []
    for i, kind in enumerate(c.layer_types):
        with jax.named_scope(f"layer_{i}"):
            x = add_at_block(residual_edit, i, x)
            residuals.append(x)
            if cached:
                key = str(i)
                x, new_cache[key] = layer_fn(
                    blocks[key], c, x, layer_rope(c, ropes, i), masks[kind], kv_cache[key], cache_index,
                    ablate=ablated(residual_edit),
                )
            else:
                x = layer_fn(blocks[str(i)], c, x, layer_rope(c, ropes, i), masks[kind], ablate=ablated(residual_edit))
    h = final_norm(params, c, x)
    out = (h, new_cache) if cached else (h,)
    out += ([*residuals, x],) if return_residuals else ()
    return out if len(out) > 1 else h


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
    params: Params, config: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None, *, remat: bool = False,
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
