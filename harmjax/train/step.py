"""The jitted fine-tuning step: response-only loss, gradient accumulation, AdamW, masking.

One call is one optimizer step over an effective batch stacked as (accum, micro, seq). A
`lax.scan` over the micro-batches sums gradients of

    sum(response-token NLL of the micro-batch) / (response tokens in the whole effective batch)

which is transformers' Trainer loss with `num_items_in_batch`: every response token of the
effective batch weighs the same, however the tokens fall into micro-batches.

The train state is a dict {"step", "trainable", "opt_state", "key"}, donated to the step.
"trainable" is the LoRA adapters (float32) or, for full fine-tuning, a float32 master copy of
the trained params (cast to the model dtype for the forward pass). With a pruning mask, full
fine-tuning zeroes the update on pruned entries AND re-zeroes them after it is applied, so
neither AdamW's decay nor rounding can move them off 0.0; LoRA removes the pruned part of its
delta inside the forward pass (see `harmjax.train.lora`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from harmjax.config import ModelConfig
from harmjax.model.decoder import forward
from harmjax.model.loss import token_nll
from harmjax.sharding import batch_sharding, replicated
from harmjax.train.lora import LoraConfig, apply_lora
from harmjax.train.optim import global_norm
from harmjax.tree import flatten, unflatten

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """(accum, micro, seq): the micro-batch rows split over data x fsdp."""
    return NamedSharding(mesh, P(None, *batch_sharding(mesh, 2).spec))


def opt_state_shardings(tx: optax.GradientTransformation, trainable: Any, trainable_shardings: Any, mesh: Mesh):
    """Shardings of `tx.init(trainable)`: every params-shaped subtree (Adam moments) takes the
    trainable leaves' shardings, scalars (counts) are replicated."""
    treedef = jax.tree.structure(trainable)
    abstract = jax.eval_shape(tx.init, trainable)

    def is_param_tree(node):
        return isinstance(node, Mapping) and jax.tree.structure(node) == treedef

    return jax.tree.map(
        lambda node: trainable_shardings if is_param_tree(node) else replicated(mesh),
        abstract, is_leaf=is_param_tree,
    )


def init_state(tx, trainable, trainable_shardings, mesh: Mesh, seed: int):
    """(state, state shardings) with a fresh optimizer state and the dropout key of `seed`."""
    opt_shardings = opt_state_shardings(tx, trainable, trainable_shardings, mesh)
    # Eager init (zeros like each leaf, placed like it): a jit here would compile anew for every
    # optimizer object, i.e. on every call.
    opt_state = jax.device_put(tx.init(trainable), opt_shardings)
    rep = replicated(mesh)
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), rep),
        "trainable": trainable,
        "opt_state": opt_state,
        "key": jax.device_put(jax.random.PRNGKey(seed), rep),
    }
    shardings = {"step": rep, "trainable": trainable_shardings, "opt_state": opt_shardings, "key": rep}
    return state, shardings


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static description of what the step trains (hashable; closed over by the jitted step).

    lora: the adapter config, or None for full fine-tuning.
    dtypes: full fine-tuning: (dotted name, model dtype) of each trained leaf, for the cast
      of the float32 master copy in the forward pass.
    """

    config: ModelConfig
    lora: LoraConfig | None = None
    dtypes: tuple[tuple[str, str], ...] = ()
    remat: bool = False


def model_params(spec: StepSpec, trainable, frozen, aux, key):
    """The params the decoder sees: LoRA-wrapped weights, or frozen params plus the trained
    leaves cast to the model dtype."""
    if spec.lora is not None:
        return apply_lora(frozen, trainable, spec.lora, aux, key)
    flat = flatten(frozen)
    dtypes = dict(spec.dtypes)
    for name, leaf in flatten(trainable).items():
        flat[name] = leaf.astype(dtypes[name])
    return unflatten(flat)


def batch_nll_sum(spec: StepSpec, params, batch) -> jax.Array:
    """Sum of response-token NLL over one (micro, seq) batch, float32."""
    logits = forward(params, spec.config, batch["input_ids"], batch["attention_mask"], remat=spec.remat)
    return token_nll(logits, batch["input_ids"], batch["loss_mask"]).sum()


def _step(spec: StepSpec, tx, schedule, state, frozen, aux, batch):
    trainable = state["trainable"]
    count = batch["loss_mask"][:, :, 1:].astype(jnp.float32).sum()
    denom = jnp.maximum(count, 1.0)
    step_key = jax.random.fold_in(state["key"], state["step"])
    accum = batch["input_ids"].shape[0]

    def micro(carry, xs):
        grad_sum, loss_sum = carry
        mb, i = xs
        key = jax.random.fold_in(step_key, i)

        def loss_fn(tr):
            return batch_nll_sum(spec, model_params(spec, tr, frozen, aux, key), mb) / denom

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (grads, loss), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)), (batch, jnp.arange(accum)))
    grad_norm = global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    if spec.lora is None and aux is not None:  # aux: bool masks of the trained leaves
        updates = _where_masked(aux, updates)
        new = _where_masked(aux, optax.apply_updates(trainable, updates))
    else:
        new = optax.apply_updates(trainable, updates)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "tokens": count}
    new_state = {"step": state["step"] + 1, "trainable": new, "opt_state": opt_state, "key": state["key"]}
    return new_state, metrics


def _where_masked(mask, tree):
    """`tree` with entries set to 0 where the (partial) bool `mask` tree is True."""
    flat, flat_mask = flatten(tree), flatten(mask)
    return unflatten({n: jnp.where(flat_mask[n], jnp.zeros_like(x), x) if n in flat_mask else x
                      for n, x in flat.items()})


def make_train_step(spec: StepSpec, tx, schedule, mesh: Mesh, state_shardings, frozen_shardings, aux_shardings):
    """jit of one optimizer step: (state, frozen, aux, batch) -> (state, metrics).

    `frozen` is the params (LoRA) or the untrained params (full fine-tuning); `aux` the LoRA
    mask plans (`lora.mask_plans`) or the full-FT bool masks of trained leaves, or None; the
    batch is a dict of (accum, micro, seq) int32 arrays. The state is donated.
    """
    batch_sh = {k: stacked_batch_sharding(mesh) for k in BATCH_KEYS}
    fn = lambda state, frozen, aux, batch: _step(spec, tx, schedule, state, frozen, aux, batch)  # noqa: E731
    return jax.jit(
        fn,
        in_shardings=(state_shardings, frozen_shardings, aux_shardings, batch_sh),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )


def make_eval_step(spec: StepSpec, mesh: Mesh, trainable_shardings, frozen_shardings, aux_shardings):
    """jit of (trainable, frozen, aux, batch (micro, seq)) -> (NLL sum, response-token count);
    no dropout."""
    if spec.lora is not None:
        spec = dataclasses.replace(spec, lora=dataclasses.replace(spec.lora, dropout=0.0))

    def fn(trainable, frozen, aux, batch):
        params = model_params(spec, trainable, frozen, aux, None)
        return batch_nll_sum(spec, params, batch), batch["loss_mask"][:, 1:].astype(jnp.float32).sum()

    batch_sh = {k: batch_sharding(mesh, 2) for k in BATCH_KEYS}
    return jax.jit(fn, in_shardings=(trainable_shardings, frozen_shardings, aux_shardings, batch_sh),
                   out_shardings=replicated(mesh))
