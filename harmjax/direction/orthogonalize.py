"""Directional ablation baked into the weights (Arditi et al. 2024, weight orthogonalization).

Every matrix that writes into the residual stream is projected so that its outputs have no
component along the unit direction r: W <- W - r r^T W on the output side, i.e. the token
embeddings (rows), each block's o_proj and down_proj (rows of their (hidden, in) weights) and
their biases. In a pre-norm decoder the residual stream is the sum of exactly these writes,
so it never carries r, which is what run-time ablation (`edits.ablation_edit`) enforces; the
logits agree to float rounding. The result is an ordinary params tree: `save_hf` exports it
and any transformers loader runs it.

Tied embeddings are untied first (the output head keeps the original table): projecting the
shared table would also change the unembedding. Families that normalise a sub-block's output
before the residual add (norm_style "post" or "sandwich") cannot be orthogonalized exactly
(the norm of a projected output generally points along r again),
and mixture-of-experts blocks are not handled: both raise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from harmjax.config import ModelConfig
from harmjax.direction.directions import unit
from harmjax.errors import UnsupportedArchitectureError

_DENSE_MLP = {"gate_proj", "up_proj", "down_proj", "gate_up_proj"}


def check_orthogonalizable(params: dict[str, Any], config: ModelConfig) -> None:
    """Raises `UnsupportedArchitectureError` unless every residual write is a plain linear map."""
    if config.norm_style != "pre":
        raise UnsupportedArchitectureError(
            f"Weight orthogonalization needs pre-norm blocks; {config.model_type} normalises each "
            f"sub-block's output before the residual add (norm_style={config.norm_style!r}): use "
            "run-time ablation (harmjax.direction.ablation_edit) instead."
        )
    for key, block in params["model"]["layers"].items():
        extra = set(block["mlp"]) - _DENSE_MLP
        if extra:
            raise UnsupportedArchitectureError(
                f"Weight orthogonalization supports dense MLPs only; {config.model_type} block {key} "
                f"has {sorted(extra)} (mixture of experts?)."
            )


@jax.jit
def _project_rows(w: jax.Array, r: jax.Array) -> jax.Array:
    """w - (w r) r^T for w (..., hidden): each row (or a bias vector) loses its r component."""
    wf = w.astype(jnp.float32)
    return (wf - (wf @ r)[..., None] * r).astype(w.dtype)


@jax.jit
def _project_cols(w: jax.Array, r: jax.Array) -> jax.Array:
    """w - r (r^T w) for an HF (hidden, in) weight: each output column loses its r component."""
    wf = w.astype(jnp.float32)
    return (wf - r[:, None] * (r @ wf)[None, :]).astype(w.dtype)


def orthogonalize(params: dict[str, Any], config: ModelConfig, direction) -> tuple[dict[str, Any], ModelConfig]:
    """Params with `direction` projected out of every residual-stream write, and their config.

    Args:
      params: the params pytree (HF names and orientation); not modified.
      config: its `ModelConfig`; a pre-norm dense family.
      direction: (hidden,) vector; only its direction matters.

    Returns (new params, config): the config differs only in `tie_word_embeddings=False` when
    the model ties its embeddings (the new tree then has `lm_head.weight`, the original table).
    """
    check_orthogonalizable(params, config)
    if jnp.shape(direction) != (config.hidden_size,):
        raise ValueError(f"direction must have shape ({config.hidden_size},), got {jnp.shape(direction)}.")
    r = jnp.asarray(unit(jax.device_get(direction)))
    out = jax.tree.map(lambda x: x, params)  # new dicts, same leaves
    embed = params["model"]["embed_tokens"]["weight"]
    out["model"]["embed_tokens"] = {"weight": _project_rows(embed, r)}
    if config.tie_word_embeddings:
        out["lm_head"] = {"weight": embed}
        config = dataclasses.replace(config, tie_word_embeddings=False)
    for block in out["model"]["layers"].values():
        for sub, name in (("self_attn", "o_proj"), ("mlp", "down_proj")):
            p = dict(block[sub][name])
            p["weight"] = _project_cols(p["weight"], r)
            if "bias" in p:
                p["bias"] = _project_rows(p["bias"], r)
            block[sub] = {**block[sub], name: p}
    return out, config


def orthogonalized_model(model, direction):
    """`model` (a `harmjax.Model`) with orthogonalized params and the matching config."""
    params, config = orthogonalize(model.params, model.config, direction)
    return dataclasses.replace(model, params=params, config=config)
