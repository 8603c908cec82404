"""Run-time interventions along a direction: directional ablation and activation addition.

Both are `harmjax.model.residual.ResidualEdit`s that the decoder applies as it runs, so a
forward pass, `mean_activations` or generation (`generate_with_edit`) can carry them without
touching the weights. For an ablation that ships as an ordinary checkpoint, see
`harmjax.direction.orthogonalize`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from harmjax.config import ModelConfig
from harmjax.direction.activations import DirectionError
from harmjax.direction.directions import unit
from harmjax.generate import GenerationResult, generate
from harmjax.model.residual import ResidualEdit


def _check_vector(config: ModelConfig, vector) -> np.ndarray:
    v = np.asarray(vector, np.float32)
    if v.shape != (config.hidden_size,):
        raise DirectionError(f"A direction must have shape ({config.hidden_size},), got {v.shape}.")
    return v


def ablation_edit(config: ModelConfig, direction) -> ResidualEdit:
    """Projects the unit vector along `direction` out of every residual state (embedding
    output, and after each attention and MLP residual add): Arditi's directional ablation."""
    return ResidualEdit(ablate=jnp.asarray(unit(_check_vector(config, direction))))


def addition_edit(config: ModelConfig, vector, layers: int | Sequence[int], coefficient: float = 1.0) -> ResidualEdit:
    """Adds `coefficient * vector` to the input of each block in `layers`, at every position.

    Arditi's activation addition uses the raw mean-difference vector of the chosen layer
    (coefficient 1) at that one layer, to induce refusal on harmless prompts; a negative
    coefficient subtracts it.
    """
    v = _check_vector(config, vector)
    layers = [layers] if isinstance(layers, int) else list(layers)
    bad = [l for l in layers if not 0 <= l < config.num_layers]
    if bad:
        raise DirectionError(f"Layers {bad} are outside 0..{config.num_layers - 1}.")
    add = np.zeros((config.num_layers, config.hidden_size), np.float32)
    add[layers] = coefficient * v
    return ResidualEdit(add=jnp.asarray(add))


def generate_with_edit(model, prompts: Sequence[str], edit: ResidualEdit, **kwargs) -> GenerationResult:
    """`harmjax.generate(model, prompts, **kwargs)` with `edit` applied at every position of
    the prompt and of the answer (e.g. `addition_edit` to induce refusal)."""
    return generate(model, prompts, residual_edit=edit, **kwargs)
