"""Choosing one refusal direction among the (layer, position) candidates (Arditi et al. 2024).

On a validation split, each candidate r (from `mean_diff_directions`) is scored three ways:
  bypass: mean refusal score on harmful prompts with r ablated (lower = refusal removed);
  induce: mean refusal score on harmless prompts with the raw r added at its layer (higher =
          refusal induced);
  kl:     mean KL(base || ablated) of the first answer token's distribution on harmless
          prompts (small = ablation leaves harmless behaviour alone).
Candidates at the last 20% of layers are skipped (there the direction is close to the
unembedding and ablating it mostly removes the refusal tokens themselves). Among those with
induce > 0 and kl < 0.1, the one with the lowest bypass is chosen.

The refusal score is log-odds at the first answer position: log p(R) - log(1 - p(R)), with
R the first tokens of refusal openings ("I", "Sorry", "As", each with and without a leading
space) as the model's tokenizer encodes them (`refusal_token_ids`). Arditi use {"I", "As"}
per model; the same rule over a fixed list of openings works for any tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from harmjax.config import ModelConfig
from harmjax.direction.activations import DirectionError, batches, chat_inputs
from harmjax.direction.edits import ablation_edit, addition_edit
from harmjax.distributed import to_host
from harmjax.inference import sharded_jit
from harmjax.model.decoder import hidden_states, logits_from_hidden
from harmjax.model.residual import ResidualEdit

REFUSAL_OPENINGS = ("I", "Sorry", "As")


def refusal_token_ids(tokenizer, openings: Sequence[str] = REFUSAL_OPENINGS) -> list[int]:
    """Sorted ids of the first token of each opening, encoded bare and after a space (a token
    that decodes to whitespace only is skipped: it would count every spaced answer)."""
    ids = set()
    for text in openings:
        for variant in (text, " " + text):
            enc = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if enc and tokenizer.decode([enc[0]]).strip():
                ids.add(int(enc[0]))
    if not ids:
        raise DirectionError(f"No refusal token found for openings {list(openings)}.")
    return sorted(ids)


@functools.lru_cache(maxsize=32)
def jit_last_logprobs(config: ModelConfig, mesh: Mesh):
    """Jitted f(params, ids, mask, edit) -> float32 log-softmax (batch, vocab) of the last
    position (the first answer token of left-padded chat prompts)."""

    def fn(params, ids, mask, edit):
        h = hidden_states(params, config, ids, mask, residual_edit=edit)
        return jax.nn.log_softmax(logits_from_hidden(params, config, h[:, -1]), axis=-1)

    return sharded_jit(fn, config, mesh, (2, 2), n_replicated=1)


def last_logprobs(model, inputs: Sequence[Sequence[int]], edit: ResidualEdit | None = None, batch_size: int = 8):
    """First-answer-token log-probabilities (len(inputs), vocab), float32, under `edit`."""
    fn = jit_last_logprobs(model.config, model.mesh)
    out = [to_host(fn(model.params, ids, mask, edit))[:rows] for rows, ids, mask in batches(model, inputs, batch_size)]
    return np.concatenate(out)


def refusal_score(logprobs: np.ndarray, refusal_ids: Sequence[int]) -> np.ndarray:
    """Per row, log p(R) - log(1 - p(R)) with p(R) the probability mass of `refusal_ids`."""
    lp = np.asarray(logprobs, np.float64)
    log_r = np.logaddexp.reduce(lp[:, list(refusal_ids)], axis=-1)
    log_r = np.minimum(log_r, -1e-12)  # p(R) < 1, so log(1 - p(R)) is finite
    return log_r - np.log(-np.expm1(log_r))


def kl_divergence(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per row, KL(p_base || p_other) from two log-probability arrays (rows, vocab)."""
    base, other = np.asarray(base, np.float64), np.asarray(other, np.float64)
    return np.sum(np.exp(base) * (base - other), axis=-1)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The chosen candidate and every candidate's scores.

    Attributes:
      layer: the chosen direction's layer (its vector is the mean difference at block `layer`'s input).
      position: its post-instruction position, negative (-1 = the last template token).
      vector: the raw mean-difference vector (hidden,), float32: add it as is, ablate its unit.
      passed_filters: False when no candidate passed the induce and KL filters, and the lowest
        bypass among all candidates was taken instead.
      baseline: mean refusal scores without any edit ("harmful", "harmless").
      table: one dict per candidate: layer, position, bypass, induce, kl, passes.
    """

    layer: int
    position: int
    vector: np.ndarray
    passed_filters: bool
    baseline: dict[str, float]
    table: list[dict]


def select_direction(
    model,
    directions: np.ndarray,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    refusal_ids: Sequence[int] | None = None,
    max_layer_fraction: float = 0.8,
    kl_threshold: float = 0.1,
    induce_threshold: float = 0.0,
    batch_size: int = 8,
    system: str | None = None,
    layers: Sequence[int] | None = None,
) -> Selection:
    """Scores every candidate of `directions` (num_layers + 1, n, hidden) on validation
    prompts and picks one by Arditi et al.'s rule (see the module docstring).

    Layers l >= int(max_layer_fraction * num_layers) are skipped; `layers` restricts the
    candidates further (e.g. every other layer: each candidate costs three forward passes).
    `refusal_ids` defaults to `refusal_token_ids(model.tokenizer)`.
    """
    cfg = model.config
    if directions.ndim != 3 or directions.shape[0] != cfg.num_layers + 1 or directions.shape[2] != cfg.hidden_size:
        raise DirectionError(f"directions must be (num_layers + 1, n, hidden), got {directions.shape}.")
    ids = list(refusal_ids) if refusal_ids is not None else refusal_token_ids(model.tokenizer)
    bad, good = chat_inputs(model.tokenizer, harmful, system), chat_inputs(model.tokenizer, harmless, system)
    base_bad, base_good = last_logprobs(model, bad, None, batch_size), last_logprobs(model, good, None, batch_size)
    n = directions.shape[1]
    table = []
    below = range(int(max_layer_fraction * cfg.num_layers))
    for layer in (below if layers is None else [l for l in layers if l in below]):
        for j in range(n):
            v = directions[layer, j]
            ablate = ablation_edit(cfg, v)
            added = addition_edit(cfg, v, layer)
            row = dict(
                layer=layer, position=j - n,
                bypass=float(refusal_score(last_logprobs(model, bad, ablate, batch_size), ids).mean()),
                induce=float(refusal_score(last_logprobs(model, good, added, batch_size), ids).mean()),
                kl=float(kl_divergence(base_good, last_logprobs(model, good, ablate, batch_size)).mean()),
            )
            row["passes"] = bool(row["induce"] > induce_threshold and row["kl"] < kl_threshold)
            table.append(row)
    if not table:
        raise DirectionError(f"No layer below {max_layer_fraction} of {cfg.num_layers} layers to select from.")
    passing = [r for r in table if r["passes"] and np.isfinite(r["bypass"])]
    best = min(passing or table, key=lambda r: r["bypass"])
    return Selection(
        layer=best["layer"], position=best["position"], vector=np.asarray(directions[best["layer"], best["position"]]),
        passed_filters=bool(passing),
        baseline={
            "harmful": float(refusal_score(base_bad, ids).mean()),
            "harmless": float(refusal_score(base_good, ids).mean()),
        },
        table=table,
    )
