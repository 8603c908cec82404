"""Mixture-of-experts feed-forward blocks (Mixtral, Qwen3-MoE, gpt-oss) as pure functions.

The params keep the checkpoint's own layout (see docs/design.md "Mixture of experts"):
  mixtral: `block_sparse_moe.gate.weight` (E, hidden) and per expert
    `block_sparse_moe.experts.{e}.w1/w3/w2.weight` (gate, up: (inter, hidden); down: (hidden, inter));
  qwen:    `mlp.gate.weight` and `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`;
  fused:   gpt-oss' `mlp.router.weight/bias`, `mlp.experts.gate_up_proj` (E, hidden, 2*inter,
    gate and up interleaved), `gate_up_proj_bias`, `down_proj` (E, inter, hidden), `down_proj_bias`.
A generation tree may replace the per-expert dicts by `experts.stacked` (`stack_experts`), so a
decode step reads one stacked array rather than re-stacking every expert.

Routing is token choice, top-k, dropless, as transformers does it per family. Three compute
paths, chosen by `ModelConfig.moe_impl` (static):
  ragged: tokens sorted by expert and `jax.lax.ragged_dot` grouped matmuls (FLOPs of the active
    experts only);
  gather: each (token, slot) reads its expert's matrices (decode: only active experts' bytes);
  dense:  every expert on every token, weighted by the (mostly zero) routing weights; the test
    and benchmark reference only.
"auto" takes gather when tokens * top_k <= experts, else ragged. Padding tokens are routed
like any token; without capacity limits they cannot change real tokens' results.

A weight leaf with a `grouped_dot` method (attribution's probes) computes its own grouped
matmul, so the scan scores each expert through the grouped matmul's own gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from harmjax.config import ModelConfig
from harmjax.model import layers
from harmjax.model.moe_specs import PARTS, ffn_key, router_key

IMPLS = ("auto", "ragged", "gather", "dense")


def _mats(p: dict[str, Any], config: ModelConfig) -> tuple[Any, Any, Any]:
    """(gate, up, down) matrices: lists of per-expert (out, in) leaves, stacked (E, in, out)
    arrays, or for the fused layout (gate_up, None, down)."""
    experts = p["experts"]
    if "stacked" in experts:
        s = experts["stacked"]
        return s.get("gate", s.get("gate_up")), s.get("up"), s["down"]
    if config.moe_layout == "fused":
        return experts["gate_up_proj"], None, experts["down_proj"]
    names = PARTS[config.moe_layout]
    per = [[experts[str(i)][n]["weight"] for i in range(config.num_experts)] for n in names]
    return tuple(per)


def _stacked(mats) -> jax.Array:
    """(E, in, out) from per-expert (out, in) leaves, or a 3-D array as it is."""
    return jnp.stack(mats).swapaxes(1, 2) if isinstance(mats, list) else mats


def _probed(mats) -> bool:
    first = mats[0] if isinstance(mats, list) else mats
    return hasattr(first, "grouped_dot")


def route(p: dict[str, Any], config: ModelConfig, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Top-k routing of tokens x (batch, seq, hidden): (weights (n, k) float32, expert ids
    (n, k)) over the n = batch * seq tokens. The router runs on the (batch, seq) layout so its
    probe sees per-example rows."""
    c = config
    r = p[router_key(c)]
    logits = layers.linear(x, r["weight"], r.get("bias"))
    logits = logits.reshape(-1, logits.shape[-1])
    if c.router == "topk_softmax":  # gpt-oss: softmax over the chosen logits only
        top, idx = jax.lax.top_k(logits, c.num_experts_per_tok)
        return jax.nn.softmax(top.astype(jnp.float32), axis=-1), idx
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, idx = jax.lax.top_k(probs, c.num_experts_per_tok)
    if c.norm_topk_prob:
        top = top / top.sum(-1, keepdims=True)
    return top, idx


def _glu(config: ModelConfig, gate: jax.Array, up: jax.Array) -> jax.Array:
    if config.swiglu_limit is None:
        return layers.activation(config.activation, gate) * up
    lim = config.swiglu_limit  # gpt-oss' clamped SwiGLU
    gate = jnp.minimum(gate, lim)
    up = jnp.clip(up, -lim, lim)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * config.swiglu_alpha))


def _expert_mlp(config: ModelConfig, p: dict[str, Any], x: jax.Array, dot, expert: jax.Array) -> jax.Array:
    """The expert MLP on rows x, with `dot(x, mats)` the path's matmul and `expert` each row's
    expert id (for gpt-oss' biases), shaped like x's leading dims."""
    gate_m, up_m, down_m = _mats(p, config)
    if up_m is None:  # fused, interleaved gate/up columns
        gu = dot(x, gate_m) + p["experts"]["gate_up_proj_bias"][expert].astype(x.dtype)
        h = _glu(config, gu[..., ::2], gu[..., 1::2])
        return dot(h, down_m) + p["experts"]["down_proj_bias"][expert].astype(x.dtype)
    h = _glu(config, dot(x, gate_m), dot(x, up_m))
    return dot(h, down_m)


def choose_impl(config: ModelConfig, tokens: int, probed: bool) -> str:
    """The compute path for `tokens` tokens under `config.moe_impl` (see the module docstring)."""
    impl = config.moe_impl
    if impl not in IMPLS:
        raise ValueError(f"moe_impl must be one of {IMPLS}, got {impl!r}.")
    if probed:
        if impl not in ("auto", "ragged"):
            raise ValueError(f"moe_impl={impl!r} cannot score experts; scans use 'ragged' (or 'auto').")
        return "ragged"
    if impl == "auto":
        return "gather" if tokens * config.num_experts_per_tok <= config.num_experts else "ragged"
    return impl


def moe_block(p: dict[str, Any], config: ModelConfig, x: jax.Array) -> jax.Array:
    """The MoE feed-forward of one block on x (batch, seq, hidden)."""
    c = config
    b, t, d = x.shape
    x2 = x.reshape(b * t, d)
    weights, idx = route(p, c, x)
    impl = choose_impl(c, b * t, _probed(_mats(p, c)[0]))
    if impl == "dense":
        out = _dense(p, c, x2, weights, idx)
    elif impl == "gather":
        out = _gather(p, c, x2, weights, idx)
    else:
        out = _ragged(p, c, x2, weights, idx, b)
    return out.reshape(b, t, d).astype(x.dtype)


def _ragged(p, config: ModelConfig, x: jax.Array, weights: jax.Array, idx: jax.Array, batch: int) -> jax.Array:
    n, d = x.shape
    k, e = config.num_experts_per_tok, config.num_experts
    flat = idx.reshape(-1)
    # Stable: within each expert's run the rows stay in token order, hence in example order
    # (per-example statistics of the probes rely on it).
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    rows = token // (n // batch)

    def dot(h, mats):
        if _probed(mats):
            first = mats[0] if isinstance(mats, list) else mats
            return first.grouped_dot(h, mats, sizes, rows, batch)
        return jax.lax.ragged_dot(h, _stacked(mats).astype(h.dtype), sizes)

    y = _expert_mlp(config, p, x[token], dot, flat[order])
    y = y.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, d), jnp.float32).at[token].add(y)


def _gather(p, config: ModelConfig, x: jax.Array, weights: jax.Array, idx: jax.Array) -> jax.Array:
    n, d = x.shape
    k = config.num_experts_per_tok
    flat = idx.reshape(-1)

    def dot(h, mats):
        return jnp.einsum("mi,mio->mo", h, _stacked(mats)[flat].astype(h.dtype))

    y = _expert_mlp(config, p, jnp.repeat(x, k, axis=0), dot, flat)
    y = y.astype(jnp.float32) * weights.reshape(-1)[:, None]
    return y.reshape(n, k, d).sum(1)


def _dense(p, config: ModelConfig, x: jax.Array, weights: jax.Array, idx: jax.Array) -> jax.Array:
    n, d = x.shape
    e = config.num_experts
    experts = jnp.arange(e)[:, None] * jnp.ones((1, n), jnp.int32)  # (E, n)

    def dot(h, mats):
        w = _stacked(mats).astype(h.dtype)
        return jnp.einsum("eni,eio->eno", h, w) if h.ndim == 3 else jnp.einsum("ni,eio->eno", h, w)

    y = _expert_mlp(config, p, x, dot, experts)  # (E, n, d)
    combine = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], idx].add(weights)
    return jnp.einsum("end,ne->nd", y.astype(jnp.float32), combine)


def stack_experts(params: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """A generation tree with each per-expert dict replaced by `experts.stacked` arrays
    ((E, in, out) gate/up/down), so decode steps do not re-stack every expert's matrices.
    Fused (gpt-oss) and dense trees come back unchanged; leaves are not copied otherwise."""
    if config.moe_layout not in PARTS:
        return params
    key = ffn_key(config)
    new_layers = {}
    for i, layer in params["model"]["layers"].items():
        block = layer.get(key)
        if block is None or "experts" not in block or "stacked" in block["experts"]:
            new_layers[i] = layer
            continue
        gate, up, down = _mats(block, config)
        stacked = {"gate": _stacked(gate), "up": _stacked(up), "down": _stacked(down)}
        new_layers[i] = {**layer, key: {**block, "experts": {"stacked": stacked}}}
    return {**params, "model": {**params["model"], "layers": new_layers}}
