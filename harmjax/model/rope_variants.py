"""RoPE tables for the variants beyond a fixed table per layer kind: partial rotary
dimensions (Phi-4-mini, `partial_rotary_factor`) and Phi-3's `longrope`, whose frequencies
switch from the short to the long factors when a forward pass reaches past
`original_max_position_embeddings`.

Both follow transformers: the rotary dimension is `int(head_dim * partial_rotary_factor)`
(the first part of each head rotates, the rest passes through, see `layers.apply_rope`),
and longrope picks one factor set for the whole call from `max(positions) + 1`, exactly as
transformers' `dynamic_rope_update` does on every forward, including each cached decode
step (so keys cached before the switch keep the short-factor rotation, as in transformers).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from harmjax.config import RopeConfig
from harmjax.model import layers


def rotary_dim(rope: RopeConfig, head_dim: int) -> int:
    """How many leading dimensions of each head RoPE rotates."""
    return int(head_dim * rope.partial_rotary_factor)


def _longrope(rope: RopeConfig, dim: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(short inv_freq, long inv_freq, cos/sin scaling), as transformers' longrope init."""
    if len(rope.short_factor) != dim // 2 or len(rope.long_factor) != dim // 2:
        raise ValueError(
            f"longrope short/long factors have {len(rope.short_factor)}/{len(rope.long_factor)} "
            f"entries; the rotary dimension {dim} needs {dim // 2}."
        )
    original = rope.original_max_position_embeddings
    scaling = rope.attention_factor
    if scaling is None:
        scaling = 1.0 if rope.factor <= 1.0 else math.sqrt(1 + math.log(rope.factor) / math.log(original))
    shape = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = np.float32(rope.theta) ** shape

    def inv(factors):
        return (1.0 / (np.asarray(factors, np.float32) * base)).astype(np.float32)

    return inv(rope.short_factor), inv(rope.long_factor), float(scaling)


def rope_tables(
    rope: RopeConfig, head_dim: int, max_position_embeddings: int, positions: jax.Array, dtype
) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables, (batch, seq, rotary_dim), of one RoPE variant at `positions`."""
    dim = rotary_dim(rope, head_dim)
    if rope.rope_type != "longrope":
        inv_freq, scaling = layers.rope_inv_freq(rope, dim, max_position_embeddings)
        return layers.rope_tables(positions, inv_freq, scaling, dtype)
    short, long, scaling = _longrope(rope, dim)
    use_long = jnp.max(positions) + 1 > rope.original_max_position_embeddings
    inv_freq = jnp.where(use_long, jnp.asarray(long), jnp.asarray(short))
    return layers.rope_tables(positions, inv_freq, scaling, dtype)
