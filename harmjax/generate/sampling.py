"""Choosing the next token from float32 logits: greedy, or temperature with nucleus (top-p)
filtering, with one explicit PRNG key per row.

Keys are per row and folded with the step number, so a row's sample depends on its own key
and step only: not on the batch it was put in, nor on how many rows were padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def row_keys(seed: int, sample_ids: Sequence[int]) -> np.ndarray:
    """Raw uint32 key data (n, 2): row r's key is fold_in(key(seed), sample_ids[r]).

    `sample_ids` should identify each prompt stably (its index in the full prompt list, or a
    hash of its id), so a prompt draws the same random numbers in whichever batch it lands.
    """
    base = jax.random.key(seed)
    ids = jnp.asarray(np.asarray(sample_ids, np.int64) % (2**31 - 1), jnp.int32)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(ids)
    return np.asarray(jax.random.key_data(keys))


def top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Sets logits outside the nucleus to -inf, row-wise.

    The nucleus is the smallest set of highest-probability tokens whose mass reaches `top_p`:
    a token is kept when the mass of the tokens ranked strictly above it is below `top_p`
    (transformers' TopPLogitsWarper; the top token is always kept).
    """
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (mass_above < top_p) | (jnp.arange(logits.shape[-1]) == 0)
    # Scatter the sorted decision back to vocabulary order.
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def sample_tokens(
    logits: jax.Array,
    key_data: jax.Array,
    step: jax.Array | int,
    temperature: jax.Array | float,
    top_p: jax.Array | float,
    *,
    greedy: bool,
    use_top_p: bool,
) -> jax.Array:
    """Next tokens (batch,) int32 from float32 logits (batch, vocab).

    Args:
      logits: float32 next-token logits.
      key_data: uint32 (batch, 2) raw keys, one per row (see `row_keys`).
      step: the index of the token being drawn; folded into each row's key.
      temperature, top_p: sampling parameters (arrays, so changing them does not recompile).
      greedy: static; argmax (ties to the lowest id, like torch.argmax), keys unused.
      use_top_p: static; apply nucleus filtering.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.asarray(temperature, jnp.float32)
    if use_top_p:
        scaled = top_p_filter(scaled, jnp.asarray(top_p, jnp.float32))
    keys = jax.random.wrap_key_data(key_data)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    return jax.vmap(jax.random.categorical)(step_keys, scaled).astype(jnp.int32)
