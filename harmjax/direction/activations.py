"""Residual-stream activations at the post-instruction positions of chat-formatted prompts.

The post-instruction positions are the chat template's tokens after the user's message (for
Llama-3 `<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`): where an instruct
model has read the whole request and not yet answered. Arditi et al. take the refusal
direction from these positions. Prompts are left-padded, so the last `n` positions of every
row are exactly these tokens, and one static slice reads them for the whole batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from harmjax.config import ModelConfig
from harmjax.data.calibration import pad_id_of
from harmjax.distributed import to_host
from harmjax.errors import HarmjaxError
from harmjax.generate.prompts import build_inputs, prompt_token_ids
from harmjax.inference import bucket_length, pad_batch, sharded_jit
from harmjax.model.decoder import hidden_states
from harmjax.model.residual import ResidualEdit
from harmjax.sharding import round_batch

# Two user messages with different last characters: their chat-formatted token lists share
# exactly the template's tail after the message.
_PROBES = ("Tell me a story.", "What is two plus two?")


class DirectionError(HarmjaxError, ValueError):
    """Bad input to the refusal-direction functions (empty prompt set, no template tail, ...)."""


def post_instruction_length(tokenizer, system: str | None = None) -> int:
    """Number of chat-template tokens after the user's message, up to where the answer starts.

    Found as the common token suffix of two chat-formatted messages that end differently.
    """
    a, b = (prompt_token_ids(tokenizer, p, chat=True, system=system) for p in _PROBES)
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    if n == 0:
        raise DirectionError("The chat template adds no tokens after the user's message; pass n_positions.")
    return n


def chat_inputs(tokenizer, prompts: Sequence[str], system: str | None = None) -> list[list[int]]:
    """Chat-formatted token ids of each prompt, ending with the generation prompt."""
    if not prompts:
        raise DirectionError("No prompts given.")
    return build_inputs(tokenizer, list(prompts), chat=True, system=system)[0]


@functools.lru_cache(maxsize=32)
def jit_residuals(config: ModelConfig, mesh: Mesh, n_positions: int):
    """Jitted f(params, ids, mask, edit) -> float32 (batch, num_layers + 1, n_positions, hidden):
    every block's input and the last block's output at the last `n_positions` positions."""

    def residuals(params, ids, mask, edit):
        _, res = hidden_states(params, config, ids, mask, residual_edit=edit, return_residuals=True)
        return jnp.stack([r[:, -n_positions:].astype(jnp.float32) for r in res], axis=1)

    return sharded_jit(residuals, config, mesh, (2, 2), n_replicated=1)


def batches(model, inputs: Sequence[Sequence[int]], batch_size: int):
    """Yields (rows, ids, mask): left-padded batches of `inputs` in order, `rows` the number of
    real rows (the rest pad the batch to a multiple of the mesh's batch extent)."""
    step = round_batch(batch_size, model.mesh)
    pad = pad_id_of(model.tokenizer) if model.tokenizer is not None else 0
    for start in range(0, len(inputs), step):
        chunk = inputs[start : start + step]
        ids, mask = pad_batch(chunk, pad, bucket_length(max(len(s) for s in chunk)), step)
        yield len(chunk), jnp.asarray(ids), jnp.asarray(mask)


def mean_activations(
    model,
    prompts: Sequence[str],
    *,
    n_positions: int | None = None,
    batch_size: int = 8,
    system: str | None = None,
    params=None,
    residual_edit: ResidualEdit | None = None,
) -> np.ndarray:
    """Mean residual-stream activation over `prompts`, float32 (num_layers + 1, n, hidden).

    Index l < num_layers is the input of block l (Arditi's resid_pre of layer l); index
    num_layers is the last block's output before the final norm. Position j is the j-th of
    the last n = `n_positions` tokens (default: all post-instruction tokens,
    `post_instruction_length`). The prompts are chat-formatted with the model's tokenizer.
    """
    n = n_positions or post_instruction_length(model.tokenizer, system)
    inputs = chat_inputs(model.tokenizer, prompts, system)
    short = [i for i, s in enumerate(inputs) if len(s) < n]
    if short:
        raise DirectionError(f"Prompts {short[:5]} have fewer than n_positions={n} tokens.")
    fn = jit_residuals(model.config, model.mesh, n)
    total = None
    for rows, ids, mask in batches(model, inputs, batch_size):
        acts = to_host(fn(model.params if params is None else params, ids, mask, residual_edit))
        part = acts[:rows].sum(axis=0, dtype=np.float64)
        total = part if total is None else total + part
    return (total / len(inputs)).astype(np.float32)
