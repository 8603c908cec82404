"""The jitted pieces of a scan: accumulators, one accumulation step, and the final scores.

The step comes in two implementations of `core.AccumulateStep`: `WholeStep` compiles the whole
forward/backward pass into one XLA program; `layerwise.LayerwiseStep` runs the same arithmetic
as one small program per decoder block. `jit_accumulate` builds (and caches) either one;
`clear_step_cache` empties that cache. Kinds, modes and formulas: `harmjax.attribution.core`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from harmjax.attribution import abs_kernel
from harmjax.attribution.core import (
    AccumulateStep, accumulator_mode, accumulator_of, accumulator_parts, act_shape, act_shardings, compiler_options,
    finalize, from_parts, grad_mode, per_mode, probe_params, scope_shardings, statistics_of,
)
from harmjax.attribution.layerwise import LayerwiseStep
from harmjax.config import ModelConfig
from harmjax.memory import program_bytes
from harmjax.model.decoder import forward
from harmjax.model.loss import mean_nll_per_example
from harmjax.model.param_specs import param_specs
from harmjax.sharding import batch_sharding, param_shardings, replicated, sharded_zeros
from harmjax.tree import flatten, unflatten


def _accumulator_tree(config: ModelConfig, mesh: Mesh, names: Sequence[str], mode: str,
                      make: Callable[[tuple[int, ...], Any], Any]) -> dict[str, Any]:
    # `make(shape, sharding)` for each scored leaf, one tree per statistic (`core.per_mode`);
    # wanda's trees are (1, in), sharded like the weight's input dimension.
    specs = param_specs(config)
    shardings = flatten(scope_shardings(config, mesh, names))
    act_sh = flatten(act_shardings(config, mesh, names))
    return per_mode(mode, lambda: unflatten({n: make(specs[n].shape, shardings[n]) for n in names}),
                    lambda: unflatten({n: make(act_shape(specs[n].shape), act_sh[n]) for n in names}))


def abstract_accumulators(config: ModelConfig, mesh: Mesh, names: Sequence[str], mode: str = "signed") -> dict[str, Any]:
    """ShapeDtypeStructs (float32, sharded like the weights) of the accumulators: the restore
    target of a scan checkpoint."""
    return _accumulator_tree(config, mesh, names, mode,
                             lambda shape, sh: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh))


def init_accumulators(config: ModelConfig, mesh: Mesh, names: Sequence[str], mode: str = "signed") -> dict[str, Any]:
    """float32 zeros over the scored leaves, each created directly in its sharding."""
    return _accumulator_tree(config, mesh, names, mode, lambda shape, sh: sharded_zeros(shape, jnp.float32, sh))


class WholeStep(AccumulateStep):
    """The accumulation step as one jitted program over the whole forward/backward pass."""

    def __init__(self, config: ModelConfig, mesh: Mesh, names: tuple[str, ...], kind, remat: bool, chunk: int,
                 kernel: str, compiler_options: dict[str, Any] | None = None):
        mode = accumulator_mode(kind)
        # The probes carry the kernel choice in their static fields (the accumulator sharding,
        # or None for XLA's path): remat'd layers cache their backward per static fields, so
        # the choice must live there and not only inside the backward rule.
        fused = grad_mode(mode) == "abs" and kernel != "off"
        flat_acc_sh = flatten(scope_shardings(config, mesh, names)) if fused else None

        def loss_fn(accs, params, input_ids, attention_mask, loss_mask):
            # wanda counts the non-padding tokens (core's module docstring).
            probed = probe_params(params, accs, mode, chunk, flat_acc_sh, token_mask=attention_mask)
            logits = forward(probed, config, input_ids, attention_mask, remat=remat)
            return mean_nll_per_example(logits, input_ids, loss_mask).sum()

        def step(params, accs, input_ids, attention_mask, loss_mask):
            loss, new_accs = jax.value_and_grad(loss_fn)(accs, params, input_ids, attention_mask, loss_mask)
            return new_accs, loss

        acc_sh = per_mode(mode, lambda: scope_shardings(config, mesh, names),
                          lambda: act_shardings(config, mesh, names))
        batch = batch_sharding(mesh)
        self._jitted = jax.jit(
            step,
            in_shardings=(param_shardings(config, mesh), acc_sh, batch, batch, batch),
            out_shardings=(acc_sh, replicated(mesh)),
            donate_argnums=(1,),
            compiler_options=compiler_options or None,
        )

    def __call__(self, params, accs, input_ids, attention_mask, loss_mask):
        """One accumulation step (`core.AccumulateStep`)."""
        return self._jitted(params, accs, input_ids, attention_mask, loss_mask)

    def lower(self, params, accs, input_ids, attention_mask, loss_mask):
        """The program lowered for these (abstract or concrete) arguments (`jax.jit(...).lower`)."""
        return self._jitted.lower(params, accs, input_ids, attention_mask, loss_mask)

    def needed_bytes(self, params, accs, input_ids, attention_mask, loss_mask) -> int:
        """Per-device bytes of the one program, from XLA's estimate (compiles it)."""
        return program_bytes(self.lower(params, accs, input_ids, attention_mask, loss_mask).compile())


def jit_accumulate(
    config: ModelConfig, mesh: Mesh, names: tuple[str, ...], kind, remat: bool = False, chunk: int = 8,
    fused_abs: bool = True, layerwise: bool = False,
) -> AccumulateStep:
    """The scan step f(params, accs, input_ids, attention_mask, loss_mask) -> (accs, loss_sum).

    `fused_abs=False` keeps the retain kind on XLA's per-example blocks even where the fused
    kernel applies (`harmjax.attribution.abs_kernel`; benchmarks compare the two).
    `layerwise=True` gives a `LayerwiseStep` (one small program per decoder block: compiles one
    block instead of all of them), else a `WholeStep`. Cached; `clear_step_cache` empties it.
    """
    # The kernel setting (HARMJAX_ABS_KERNEL) and the compiler options are part of the cache
    # key, so a changed setting builds and traces a new step instead of reusing an old one.
    kernel = abs_kernel.mode() if fused_abs else "off"
    return _cached_step(config, mesh, names, kind, remat, chunk, kernel, compiler_options(mesh), layerwise)


@functools.lru_cache(maxsize=32)
def _cached_step(config, mesh, names, kind, remat, chunk, kernel, options, layerwise) -> AccumulateStep:
    implementation = LayerwiseStep if layerwise else WholeStep
    return implementation(config, mesh, names, kind, remat, chunk, kernel, dict(options))


def clear_step_cache() -> None:
    """Forgets every step `jit_accumulate` built (tests that change $HARMJAX_ABS_KERNEL or
    other process-wide settings start from no compiled step)."""
    _cached_step.cache_clear()


def step_bytes(step, params, accs, input_ids, attention_mask, loss_mask) -> int:
    """Per-device bytes a step needs on these (abstract or concrete) arguments: an
    `AccumulateStep`'s `needed_bytes`, or for any other jitted function with the same
    arguments (a benchmark's experimental step), XLA's estimate of its one program."""
    if isinstance(step, AccumulateStep):
        return step.needed_bytes(params, accs, input_ids, attention_mask, loss_mask)
    return program_bytes(step.lower(params, accs, input_ids, attention_mask, loss_mask).compile())


@functools.lru_cache(maxsize=16)
def jit_finalize(config: ModelConfig, mesh: Mesh, names: tuple[str, ...], kind):
    """f(params, accs) -> scores over the scored leaves, jitted, the gradient accumulators
    donated; for a tuple of kinds, {kind: scores}. Magnitude needs no accumulators ({} when
    it is the only kind)."""
    mode = accumulator_mode(kind)
    acc_sh = scope_shardings(config, mesh, names)
    grad_sh = {s: acc_sh for s in statistics_of(mode) if s != "act"}
    kept_sh = {"act": act_shardings(config, mesh, names)} if "act" in statistics_of(mode) else {}

    def one(k, flat_params, accs):
        acc = accumulator_of(k, mode, accs)
        flat_acc = {} if acc is None else flatten(acc)
        return unflatten({n: finalize(k, flat_params[n], flat_acc.get(n)) for n in names})

    def scores(params, grads, kept):
        flat, accs = flatten(params), from_parts(mode, {**grads, **kept})
        if isinstance(kind, str):
            return one(kind, flat, accs)
        return {k: one(k, flat, accs) for k in kind}

    # The gradient trees are donated (their buffers become the scores); wanda's (1, in) sums
    # are not, as no output could reuse them.
    jitted = jax.jit(
        scores,
        in_shardings=(param_shardings(config, mesh), grad_sh, kept_sh),
        out_shardings=acc_sh if isinstance(kind, str) else {k: acc_sh for k in kind},
        donate_argnums=(1,),
    )

    def run(params, accs):
        parts = accumulator_parts(mode, accs)
        kept = {"act": parts.pop("act")} if "act" in parts else {}
        return jitted(params, parts, kept)

    return run
