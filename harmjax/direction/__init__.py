"""The refusal direction (Arditi et al. 2024): find it, choose it, ablate it, add it.

  dirs = mean_diff_directions(model, harmful_train, harmless_train)   # (layers + 1, n, hidden)
  sel = select_direction(model, dirs, harmful_val, harmless_val)      # sel.layer, sel.position, sel.table
  ablated = orthogonalized_model(model, sel.vector)                   # an ordinary checkpoint
  harmjax.save_hf(ablated, "out/")                                    # loads in transformers
  refusing = generate_with_edit(model, prompts, addition_edit(model.config, sel.vector, sel.layer))

Activations are read at the post-instruction positions (the chat template's tokens after the
user's message) of the residual stream: each block's input and the last block's output.
"""

from harmjax.direction.activations import (
    DirectionError,
    chat_inputs,
    jit_residuals,
    mean_activations,
    post_instruction_length,
)
from harmjax.direction.directions import mean_diff_directions, unit
from harmjax.direction.edits import ablation_edit, addition_edit, generate_with_edit
from harmjax.direction.orthogonalize import check_orthogonalizable, orthogonalize, orthogonalized_model
from harmjax.direction.selection import (
    REFUSAL_OPENINGS,
    Selection,
    kl_divergence,
    last_logprobs,
    refusal_score,
    refusal_token_ids,
    select_direction,
)
from harmjax.model.residual import ResidualEdit

__all__ = [
    "REFUSAL_OPENINGS",
    "DirectionError",
    "ResidualEdit",
    "Selection",
    "ablation_edit",
    "addition_edit",
    "chat_inputs",
    "check_orthogonalizable",
    "generate_with_edit",
    "jit_residuals",
    "kl_divergence",
    "last_logprobs",
    "mean_activations",
    "mean_diff_directions",
    "orthogonalize",
    "orthogonalized_model",
    "post_instruction_length",
    "refusal_score",
    "refusal_token_ids",
    "select_direction",
    "unit",
]
