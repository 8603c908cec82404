"""Token-level losses on top of the decoder's logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Per-token next-token NLL, float32 (batch, seq-1).

    Position t scores token t+1; `loss_mask` (batch, seq) marks the tokens that count as
    targets (1) and is shifted the same way. Masked positions are 0.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = input_ids[:, 1:]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return nll * loss_mask[:, 1:].astype(jnp.float32)


def mean_nll_per_example(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean NLL over each example's target tokens, float32 (batch,); 0 for an empty mask."""
    nll = token_nll(logits, input_ids, loss_mask)
    count = loss_mask[:, 1:].astype(jnp.float32).sum(-1)
    return nll.sum(-1) / jnp.maximum(count, 1.0)
