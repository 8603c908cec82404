"""Attribution of any JAX/Flax model: the gradient score kinds and magnitude for an arbitrary apply function.

`harmjax.scan` scores harmjax's own decoder through probed weights (the accumulators ride in
the backward pass of each linear map). `attribute` serves every other model: a Flax linen
module, an NNX model, or any function `apply_fn(params, input_ids, attention_mask) -> logits`
over any params pytree. It differentiates the same response-only loss (each example's mean
next-token NLL over its `loss_mask` tokens) with plain `jax.grad`:

  harm, retain_mean  one gradient of the batch's summed losses per micro-batch (signed sum)
  retain             per-example gradients, `chunk` examples at a time (`jax.vmap` inside a
                     `lax.scan`), so the transient memory is bounded by `chunk` float32
                     copies of the scored weights whatever the batch size (in practice
                     XLA reduces each matrix's block as soon as it is formed: see docs/design.md "Attribution: any model")

and adds them to float32 accumulators sharded like the weights they score; `magnitude` (|W|)
needs no pass. `wanda` needs the input of each linear map, which only harmjax's own decoder
exposes (its probes): use `harmjax.scan` for it. The scores are the
same formulas as `harmjax.attribution.core.finalize`, returned as a nested dict keyed by the
scored leaves' dotted paths (`harmjax.tree.path_name`), so `select`, the mask algebra and
`apply_mask` take them unchanged, on harmjax params, linen params or an NNX `State`.

Precision: each micro-batch's gradient comes out of `jax.grad` in the weights' dtype before the
float32 addition; the probe path forms it as a float32 dot. For harmjax models in bfloat16,
prefer `harmjax.scan` (see docs/measurements.md "Attribution scans at 8B" for the measured speed and memory of both).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from harmjax.attribution.core import (
    Scope, accumulator_mode, accumulator_of, finalize, grad_mode, per_mode, scoped_names, statistics_of,
)
from harmjax.errors import ScoreKindError
from harmjax.data.records import DatasetFormatError
from harmjax.distributed import process_local_batch
from harmjax.model.loss import mean_nll_per_example
from harmjax.sharding import MeshConfig, batch_divisor, batch_sharding, make_mesh, replicated, sharded_zeros
from harmjax.tree import path_name, unflatten

ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
_BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")
_finalize = jax.jit(finalize, static_argnums=0)


def _host_batch(batch: Any, position: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, loss_mask) of a Batch or a mapping, checked."""
    get = batch.get if isinstance(batch, Mapping) else lambda k: getattr(batch, k, None)
    arrays = []
    for key in _BATCH_KEYS:
        value = get(key)
        if value is None:
            raise DatasetFormatError(f"Batch {position} has no {key!r}; each batch needs {list(_BATCH_KEYS)}.")
        arrays.append(np.asarray(value))
    shapes = {k: a.shape for k, a in zip(_BATCH_KEYS, arrays)}
    if arrays[0].ndim != 2 or len(set(shapes.values())) != 1:
        raise DatasetFormatError(f"Batch {position}: input_ids, attention_mask and loss_mask must share one "
                                 f"(batch, length) shape; got {shapes}.")
    return arrays[0].astype(np.int32), arrays[1].astype(np.int32), arrays[2].astype(np.int32)


def _pad_rows(arrays, rows: int):
    # Filler rows have all-zero masks: zero loss, zero gradient, so they change no score.
    missing = -arrays[0].shape[0] % rows
    return [np.pad(a, ((0, missing), (0, 0))) for a in arrays]


def _acc_sharding(leaf: Any, mesh: Mesh):
    sharding = getattr(leaf, "sharding", None)
    return sharding if isinstance(sharding, NamedSharding) and sharding.mesh == mesh else replicated(mesh)


@functools.lru_cache(maxsize=8)
def _jit_step(apply_fn: ApplyFn, treedef, index: tuple[int, ...], mode: str, chunk: int):
    """step(params_leaves, accs, ids, attention_mask, loss_mask) -> (accs, loss_sum), jitted with
    the accumulators donated. Cached, so calling `attribute` again with the same `apply_fn`
    object (one call per harm category, say) does not trace and compile again."""

    def losses(scored, leaves, ids, am, lm):
        leaves = list(leaves)
        for j, i in enumerate(index):
            leaves[i] = scored[j]
        logits = apply_fn(jax.tree.unflatten(treedef, leaves), ids, am)
        chex.assert_rank(logits, 3)  # apply_fn must return (batch, length, vocab)
        return mean_nll_per_example(logits, ids, lm)

    def step(leaves, accs, ids, am, lm):
        scored = [leaves[i] for i in index]
        if mode == "signed":
            loss, grads = jax.value_and_grad(lambda s: losses(s, leaves, ids, am, lm).sum())(scored)
            return [a + g.astype(jnp.float32) for a, g in zip(accs, grads)], loss

        # Per-example gradients, `chunk` rows at a time. Rows are regrouped so that each chunk
        # takes rows strided across the batch: with the batch split over devices, every chunk
        # stays split the same way and no row moves between devices.
        def one(s, i, a, m):
            return losses(s, leaves, i[None], a[None], m[None])[0]

        grad_one = jax.vmap(jax.value_and_grad(one), in_axes=(None, 0, 0, 0))
        groups = [x.reshape(chunk, -1, x.shape[-1]).swapaxes(0, 1) for x in (ids, am, lm)]

        def body(carry, group):
            abs_acc, signed_acc, loss = carry
            values, grads = grad_one(scored, *group)
            grads = [g.astype(jnp.float32) for g in grads]
            abs_acc = [a + jnp.abs(g).sum(0) for a, g in zip(abs_acc, grads)]
            if mode == "both":
                signed_acc = [a + g.sum(0) for a, g in zip(signed_acc, grads)]
            return (abs_acc, signed_acc, loss + values.sum()), None

        abs_acc, signed_acc = (accs["abs"], accs["signed"]) if mode == "both" else (accs, [])
        (abs_acc, signed_acc, loss), _ = jax.lax.scan(body, (abs_acc, signed_acc, jnp.float32(0)), groups)
        return ({"abs": abs_acc, "signed": signed_acc} if mode == "both" else abs_acc), loss

    return jax.jit(step, donate_argnums=(1,))


def attribute(
    apply_fn: ApplyFn,
    params: Any,
    batches: Iterable[Any],
    kind: str | Sequence[str] = "harm",
    *,
    scope: Scope = None,
    mesh: Mesh | MeshConfig | None = None,
    chunk: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Attribution scores of any model: signed SNIP (`harm`) or utility (`retain`, `retain_mean`).

    Args:
      apply_fn: `apply_fn(params, input_ids, attention_mask) -> logits (batch, length, vocab)`,
        e.g. `lambda p, ids, m: module.apply({"params": p}, ids)` for linen, or
        `lambda s, ids, m: nnx.merge(graphdef, s)(ids)` for NNX with `params=state`.
      params: any pytree (harmjax params, linen params, an NNX `State`); its leaves may be
        sharded on `mesh` (the accumulators then take the same shardings).
      batches: `harmjax.data.calibration.Batch`es or mappings with int (batch, length)
        `input_ids`, `attention_mask` and `loss_mask` (1 = a response token that counts);
        `harmjax.data.calibration.calibration_batches` makes them from examples. Rows are
        padded with empty filler rows to a multiple of the mesh's batch extent (and of
        `chunk` for `retain`).
      kind: "harm" (-W * sum_i dL_i/dW), "retain" (|W| * sum_i |dL_i/dW|), "retain_mean"
        (|W * sum_i dL_i/dW|), "magnitude" (|W|), or a tuple of them from one pass (then
        {kind: scores}). "wanda" is `harmjax.scan`'s only (ScoreKindError here).
      scope: which leaves to score (see `scoped_names`).
      mesh: the mesh the batch is split over (data x fsdp); default all devices on `data`.
      chunk: examples per block of per-example gradients (`retain` only): the memory bound.
      progress: show a tqdm bar.

    Returns:
      float32 scores as a nested dict over the scored leaves' dotted names.
    """
    kinds = kind if isinstance(kind, str) else tuple(kind)
    mode = accumulator_mode(kinds)  # validates the kinds
    if "act" in statistics_of(mode):
        raise ScoreKindError("attribute cannot score 'wanda': it needs each linear map's inputs, which only "
                             "harmjax's decoder exposes; use harmjax.scan on a harmjax model.")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}.")
    mesh = mesh if isinstance(mesh, Mesh) else make_mesh(mesh)
    names = scoped_names(params, scope)
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    position = {path_name(p): i for i, (p, _) in enumerate(with_path)}
    index = tuple(position[n] for n in names)
    leaves = [x for _, x in with_path]

    def zeros():
        return [sharded_zeros(np.shape(leaves[i]), jnp.float32, _acc_sharding(leaves[i], mesh)) for i in index]

    accs = per_mode(mode, zeros)
    step = _jit_step(apply_fn, treedef, index, mode, chunk)
    rows_multiple = batch_divisor(mesh) * (1 if mode == "signed" else chunk // math.gcd(chunk, batch_divisor(mesh)))
    sharding = batch_sharding(mesh)
    batches = list(batches)
    if not batches:
        raise ValueError("No batches to score.")
    if grad_mode(mode) == "none":  # magnitude only: no pass over the data
        batches = []
    for position_, batch in enumerate(tqdm(batches, desc=f"attribute {kinds}", unit="batch", disable=not progress)):
        arrays = _pad_rows(_host_batch(batch, position_), rows_multiple)
        device = [process_local_batch(a, sharding) for a in arrays]
        accs, _ = step(leaves, accs, *device)

    def scores_of(k: str) -> dict[str, Any]:
        acc = accumulator_of(k, mode, accs)
        acc = [None] * len(names) if acc is None else acc
        return unflatten({n: _finalize(k, leaves[i], a) for n, i, a in zip(names, index, acc)})

    return scores_of(kinds) if isinstance(kinds, str) else {k: scores_of(k) for k in kinds}
