"""Candidate refusal directions: difference of mean activations, harmful minus harmless.

Arditi et al. (2024) compute, at every layer l and post-instruction position i, the mean
residual-stream activation over harmful instructions minus that over harmless ones; each
(l, i) is a candidate, and `harmjax.direction.selection` picks one on a validation split.
The vectors are kept raw (not unit): activation addition adds the raw vector, ablation uses
its unit direction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from harmjax.direction.activations import mean_activations, post_instruction_length


def mean_diff_directions(
    model,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    n_positions: int | None = None,
    batch_size: int = 8,
    system: str | None = None,
) -> np.ndarray:
    """Candidate directions, float32 (num_layers + 1, n, hidden): mean activation over the
    `harmful` prompts minus that over the `harmless` prompts, per layer and position.

    Layers and positions index as in `mean_activations` (row l is the input of block l; the
    last row is the last block's output). n defaults to every post-instruction token.
    """
    n = n_positions or post_instruction_length(model.tokenizer, system)
    kw = dict(n_positions=n, batch_size=batch_size, system=system)
    return mean_activations(model, harmful, **kw) - mean_activations(model, harmless, **kw)


def unit(vector: np.ndarray) -> np.ndarray:
    """`vector` over its norm (float32); the direction ablation projects out."""
    v = np.asarray(vector, np.float32)
    return v / max(float(np.linalg.norm(v)), np.finfo(np.float32).tiny)
