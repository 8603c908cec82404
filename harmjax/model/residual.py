"""Run-time edits of the residual stream: directional ablation and activation addition.

A `ResidualEdit` is a pytree of arrays the decoder applies while it runs (see
`harmjax.model.decoder.hidden_states`), so the same jitted program serves every direction
and coefficient (they are traced arguments, not constants). It is the run-time counterpart
of `harmjax.direction.orthogonalize`, which bakes an ablation into the weights.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ResidualEdit(NamedTuple):
    """What the decoder does to the residual stream.

    Attributes:
      ablate: (hidden,) unit vector r or None. r is projected out (x <- x - (x.r) r) of every
        residual state: after the embedding and after each sub-block's residual add (the
        attention's and the MLP's), so no block reads or writes along r. Arditi et al.'s
        directional ablation (resid_pre, resid_mid and resid_post of every layer).
      add: (num_layers, hidden) or None. Row i is added to the input of block i at every
        position (zeros where nothing is added): activation addition at chosen layers.
    """

    ablate: jax.Array | None = None
    add: jax.Array | None = None


def project_out(x: jax.Array, direction: jax.Array | None) -> jax.Array:
    """x - (x . r) r over the last axis, computed in float32 and cast back; x when r is None."""
    if direction is None:
        return x
    xf = x.astype(jnp.float32)
    r = direction.astype(jnp.float32)
    return (xf - (xf @ r)[..., None] * r).astype(x.dtype)


def add_at_block(edit: ResidualEdit | None, layer: int, x: jax.Array) -> jax.Array:
    """Block `layer`'s input with the edit's addition for that block (x when there is none)."""
    if edit is None or edit.add is None:
        return x
    return x + edit.add[layer].astype(x.dtype)


def ablated(edit: ResidualEdit | None) -> jax.Array | None:
    """The direction the edit projects out, or None."""
    return None if edit is None else edit.ablate
