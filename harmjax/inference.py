"""Jitted, explicitly sharded entry points over a loaded model: logits and text NLL."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from harmjax.config import ModelConfig
from harmjax.distributed import to_host
from harmjax.model.decoder import forward
from harmjax.model.loss import mean_nll_per_example
from harmjax.sharding import batch_sharding, param_shardings, replicated, round_batch


@functools.lru_cache(maxsize=32)
def jit_forward(config: ModelConfig, mesh: Mesh):
    """`forward` jitted with the params' shardings, the batch split over data x fsdp.

    Returns f(params, input_ids, attention_mask) -> float32 logits (batch, seq, vocab).
    """
    batch = batch_sharding(mesh)

    def logits(params, input_ids, attention_mask):
        return forward(params, config, input_ids, attention_mask)

    return jax.jit(
        logits,
        in_shardings=(param_shardings(config, mesh), batch, batch),
        out_shardings=batch_sharding(mesh, ndim=3),
    )


@functools.lru_cache(maxsize=32)
def _jit_example_nll(config: ModelConfig, mesh: Mesh):
    batch = batch_sharding(mesh)

    def nll(params, input_ids, attention_mask, loss_mask):
        logits = forward(params, config, input_ids, attention_mask)
        return mean_nll_per_example(logits, input_ids, loss_mask)

    return jax.jit(
        nll,
        in_shardings=(param_shardings(config, mesh), batch, batch, batch),
        out_shardings=replicated(mesh),
    )


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
    run through the sharded, jitted forward pass.
    """
    tok = model.tokenizer
    from harmjax.data.calibration import pad_id_of

    pad_id = pad_id_of(tok)
    encoded = [tok(t, add_special_tokens=True)["input_ids"][:max_length] for t in texts]
    step = round_batch(batch_size, model.mesh)
    fn = _jit_example_nll(model.config, model.mesh)
    out = []
    for start in range(0, len(encoded), step):
        chunk = encoded[start : start + step]
        length = bucket_length(max(len(s) for s in chunk))
        ids, mask = pad_batch(chunk, pad_id, length, step)
        out.append(to_host(fn(model.params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(mask)))[: len(chunk)])
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
    fn = _jit_example_nll(model.config, model.mesh)
    params = model.params if params is None else params
    out = np.full((len(examples),), np.nan, np.float32)
    for b in batches:
        nll = to_host(fn(params, jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask), jnp.asarray(b.loss_mask)))
        real = b.index >= 0
        out[b.index[real]] = nll[real]
    return out
