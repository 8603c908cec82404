"""Jitted, explicitly sharded entry points over a loaded model: logits and token log-probabilities.

`token_logprobs` is the one scoring core every log-likelihood measurement builds on: response
and text NLL (here), perplexity and multiple choice (`harmjax.evaluate.perplexity`), the
StrongREJECT judge's score tokens, opening log-probabilities and recognition
(`harmjax.evaluate.openings`), NLL selectivity. It runs the decoder once, projects onto the
vocabulary only the positions asked for, and returns log p(token | prefix) for the chosen
tokens, optionally summed or averaged over them inside the jit. `sharded_jit` is the jit +
sharding helper it shares with the other jitted model functions (`jit_forward`, the number
judge's trie forward).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, Sharding

from harmjax.config import ModelConfig
from harmjax.distributed import to_host
from harmjax.model.decoder import forward, hidden_states, logits_from_hidden
from harmjax.sharding import batch_sharding, param_shardings, replicated, round_batch

REDUCTIONS = ("none", "sum", "mean")


def sharded_jit(
    fn: Callable,
    config: ModelConfig,
    mesh: Mesh,
    batch_ndims: Sequence[int],
    n_replicated: int = 0,
    out_sharding: Sharding | None = None,
):
    """`jax.jit(fn)` for fn(params, *batch_args, *replicated_args) on the model's mesh.

    The params take the model's shardings; each of the `len(batch_ndims)` batch arguments is
    split over data x fsdp on its first axis (a spec of `batch_ndims[i]` entries: 1 for a
    (batch,) vector, 2 for (batch, ...) arrays of any rank >= 2); the `n_replicated` arguments
    after them are replicated. The output is replicated unless `out_sharding` says otherwise.
    """
    shardings = (
        param_shardings(config, mesh),
        *(batch_sharding(mesh, ndim=n) for n in batch_ndims),
        *(replicated(mesh),) * n_replicated,
    )
    out = replicated(mesh) if out_sharding is None else out_sharding
    return jax.jit(fn, in_shardings=shardings, out_shardings=out)


@functools.lru_cache(maxsize=32)
def jit_forward(config: ModelConfig, mesh: Mesh):
    """`forward` jitted with the params' shardings, the batch split over data x fsdp.

    Returns f(params, input_ids, attention_mask) -> float32 logits (batch, seq, vocab).
    """

    def logits(params, input_ids, attention_mask):
        return forward(params, config, input_ids, attention_mask)

    return sharded_jit(logits, config, mesh, (2, 2), out_sharding=batch_sharding(mesh, ndim=3))


def gathered_logprobs(params, config: ModelConfig, input_ids, attention_mask, positions, tokens) -> jax.Array:
    """float32 log_softmax(logits)[b, positions[b, k], tokens[b, k(, t)]], traceable.

    `positions` (batch, K) are the positions whose next-token distribution is read; `tokens`
    is (batch, K) (one token per position) or (batch, K, T) (T tokens at each position). The
    vocabulary projection runs on the K gathered positions only, with one logsumexp each.
    """
    h = hidden_states(params, config, input_ids, attention_mask)
    h = jnp.take_along_axis(h, positions[..., None].astype(jnp.int32), axis=1)  # (batch, K, hidden)
    logits = logits_from_hidden(params, config, h)  # (batch, K, vocab) float32
    norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    per_position = tokens.ndim == 3
    picked = jnp.take_along_axis(logits, tokens if per_position else tokens[..., None], axis=-1)
    lp = picked - norm
    return lp if per_position else lp[..., 0]


@functools.lru_cache(maxsize=64)
def jit_token_logprobs(config: ModelConfig, mesh: Mesh, reduce: str = "none"):
    """The scoring core, jitted and sharded once per (config, mesh, reduce).

    reduce "none": f(params, ids, mask, positions, tokens) -> `gathered_logprobs`.
    reduce "sum" / "mean": f(params, ids, mask, positions, tokens, weights) -> (batch,) the
    weighted sum of the (batch, K) log-probs, or that sum over max(sum of weights, 1) (so an
    all-zero row gives 0).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}.")

    def scores(params, input_ids, attention_mask, positions, tokens, *weights):
        lp = gathered_logprobs(params, config, input_ids, attention_mask, positions, tokens)
        if reduce == "none":
            return lp
        w = weights[0].astype(jnp.float32)
        total = (lp * w).sum(-1)
        return total if reduce == "sum" else total / jnp.maximum(w.sum(-1), 1.0)

    return sharded_jit(scores, config, mesh, (2,) * (4 if reduce == "none" else 5))


def token_logprobs(
    model,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    positions: np.ndarray,
    tokens: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    reduce: str = "none",
    params: Any = None,
) -> np.ndarray:
    """log p(tokens at positions) of one padded batch under `model` (or `params`), float32 NumPy.

    Args:
      input_ids, attention_mask: (batch, seq), batch a multiple of the mesh's data x fsdp extent.
      positions: (batch, K) positions whose next-token distribution is read.
      tokens: (batch, K) or (batch, K, T) token ids scored at those positions.
      weights: (batch, K), required for reduce "sum" / "mean" (see `jit_token_logprobs`).
      reduce: "none" -> the gathered log-probs; "sum" / "mean" -> (batch,).
      params: overrides `model.params` (e.g. a masked copy).
    """
    if (weights is None) != (reduce == "none"):
        raise ValueError(f"weights are needed exactly when reduce is 'sum' or 'mean' (reduce={reduce!r}).")
    fn = jit_token_logprobs(model.config, model.mesh, reduce)
    arrays = (input_ids, attention_mask, positions, tokens) + (() if weights is None else (weights,))
    return to_host(fn(model.params if params is None else params, *(jnp.asarray(a) for a in arrays)))


def next_token_targets(input_ids: np.ndarray, loss_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions, tokens, weights) that score token t+1 at position t for every t < seq-1,
    weighted by `loss_mask[:, t+1]`: the gather indices of a whole-sequence NLL."""
    input_ids = np.asarray(input_ids)
    b, seq = input_ids.shape
    positions = np.broadcast_to(np.arange(seq - 1, dtype=np.int32), (b, seq - 1))
    return positions, input_ids[:, 1:], np.asarray(loss_mask)[:, 1:].astype(np.float32)


def mean_nll(model, input_ids, attention_mask, loss_mask, params: Any = None) -> np.ndarray:
    """Mean next-token NLL over the tokens `loss_mask` marks, per row (float32, 0 for none)."""
    positions, tokens, weights = next_token_targets(input_ids, loss_mask)
    return -token_logprobs(model, input_ids, attention_mask, positions, tokens, weights, reduce="mean", params=params)


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, length: int, batch: int, left: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Pads token lists into (batch, length) ids and a 0/1 attention mask (left padding by default).

    Rows beyond len(sequences) are all padding (mask 0), so batch shapes stay fixed.
    """
    ids = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for i, seq in enumerate(sequences):
        seq = list(seq)[-length:]
        if left:
            ids[i, length - len(seq):], mask[i, length - len(seq):] = seq, 1
        else:
            ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
    return ids, mask


def bucket_length(n: int, minimum: int = 16) -> int:
    """The next power of two >= n (at least `minimum`), so XLA compiles few shapes."""
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def text_nll(model, texts: Sequence[str], batch_size: int = 8, max_length: int = 512) -> np.ndarray:
    """Mean next-token NLL of each text under `model` (float32, one value per text).

    Texts are tokenized with the model's tokenizer, left-padded to a power-of-two bucket and
    scored with `token_logprobs` (every token after the first).
    """
    tok = model.tokenizer
    from harmjax.data.calibration import pad_id_of

    pad_id = pad_id_of(tok)
    encoded = [tok(t, add_special_tokens=True)["input_ids"][:max_length] for t in texts]
    step = round_batch(batch_size, model.mesh)
    out = []
    for start in range(0, len(encoded), step):
        chunk = encoded[start : start + step]
        ids, mask = pad_batch(chunk, pad_id, bucket_length(max(len(s) for s in chunk)), step)
        out.append(mean_nll(model, ids, mask, mask)[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def response_nll(
    model,
    examples,
    text_format: str = "raw",
    batch_size: int = 8,
    max_length: int = 256,
    params=None,
    num_buckets: int = 4,
) -> np.ndarray:
    """Mean NLL over each example's response tokens (float32, one value per example, input order).

    Examples are `harmjax.data.records.Example`s (prompt, response); tokenization and the
    response-only mask are those of attribution (`harmjax.data.calibration`), so this is the
    loss whose gradient the harm score takes. `params` overrides the model's (e.g. a masked copy).
    `num_buckets` padded lengths are used (each compiles once; 1 = one compilation).
    """
    from harmjax.data.calibration import calibration_batches

    step = round_batch(batch_size, model.mesh)
    batches = calibration_batches(model.tokenizer, examples, step, text_format, max_length, num_buckets)
    out = np.full((len(examples),), np.nan, np.float32)
    for b in batches:
        nll = mean_nll(model, b.input_ids, b.attention_mask, b.loss_mask, params)
        real = b.index >= 0
        out[b.index[real]] = nll[real]
    return out
