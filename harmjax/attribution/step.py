"""The jitted pieces of a scan: accumulator init, one accumulation step, and the final scores.

KINDS and what they accumulate / return (W = the weight, L_i = mean response NLL of example i):
  harm:         G = sum_i dL_i/dW          -> -W * G          (signed SNIP)
  retain:       A = sum_i |dL_i/dW|        -> |W| * A         (released code's utility score)
  retain_mean:  G = sum_i dL_i/dW          -> |W * G|         (the paper text's utility score)
Everything is float32 whatever the parameter dtype. Sums over examples make every score
independent of batch size and of how the batch is split over devices.

`kind` may also be a tuple of kinds, e.g. ("retain", "harm") on a benign set: one backward pass
then accumulates what all of them need (both G and A when they differ, as {"abs", "signed"}
accumulator trees) and the scores come back as {kind: tree}.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from harmjax.attribution import abs_kernel
from harmjax.attribution.probes import ProbedWeight
from harmjax.attribution.scope import scored_names
from harmjax.config import ModelConfig
from harmjax.model.decoder import forward
from harmjax.model.loss import mean_nll_per_example
from harmjax.sharding import batch_sharding, param_shardings, replicated, sharded_zeros
from harmjax.tree import flatten, unflatten

KINDS = ("harm", "retain", "retain_mean")


def _kinds(kind) -> tuple[str, ...]:
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"Unknown score kind {k!r}; choose one of {KINDS}.")
    if not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"Score kinds must be one or more distinct names of {KINDS}; got {kind!r}.")
    return kinds


def accumulator_mode(kind) -> str:
    """"abs" for per-example absolute gradients, "signed" for plain gradient sums, "both" when
    a tuple of kinds needs the two."""
    modes = {"abs" if k == "retain" else "signed" for k in _kinds(kind)}
    return modes.pop() if len(modes) == 1 else "both"


def _per_mode(mode: str, tree_fn):
    # "both" keeps one accumulator tree per statistic.
    return {"abs": tree_fn(), "signed": tree_fn()} if mode == "both" else tree_fn()


def scope_shardings(config: ModelConfig, mesh: Mesh, names: Sequence[str]) -> dict[str, Any]:
    """The params' shardings restricted to the scored leaves (accumulators and scores use them)."""
    flat = flatten(param_shardings(config, mesh))
    return unflatten({n: flat[n] for n in names})


def abstract_accumulators(config: ModelConfig, mesh: Mesh, names: Sequence[str], mode: str = "signed") -> dict[str, Any]:
    """ShapeDtypeStructs (float32, sharded like the weights) of the accumulators: the restore
    target of a scan checkpoint."""
    from harmjax.model.param_specs import param_specs

    specs = param_specs(config)
    shardings = flatten(scope_shardings(config, mesh, names))
    return _per_mode(mode, lambda: unflatten({
        n: jax.ShapeDtypeStruct(specs[n].shape, jnp.float32, sharding=shardings[n]) for n in names
    }))


def init_accumulators(config: ModelConfig, mesh: Mesh, names: Sequence[str], mode: str = "signed") -> dict[str, Any]:
    """float32 zeros over the scored leaves, each created directly in its sharding."""
    from harmjax.model.param_specs import param_specs

    specs = param_specs(config)
    shardings = flatten(scope_shardings(config, mesh, names))
    return _per_mode(mode, lambda: unflatten({
        n: sharded_zeros(specs[n].shape, jnp.float32, shardings[n])
        for n in names
    }))


def _probe(params: dict[str, Any], accs: dict[str, Any], mode: str, chunk: int,
           shardings: dict[str, Any] | None = None) -> dict[str, Any]:
    """params with each scored weight replaced by a ProbedWeight carrying its accumulator (and,
    given `shardings`, the accumulator's sharding, which lets "abs" mode use the fused kernel)."""
    shardings = shardings or {}
    flat = flatten(params)
    if mode == "both":
        signed = flatten(accs["signed"])
        for name, acc in flatten(accs["abs"]).items():
            flat[name] = ProbedWeight(flat[name], (acc, signed[name]), mode, chunk)
    else:
        for name, acc in flatten(accs).items():
            flat[name] = ProbedWeight(flat[name], acc, mode, chunk, shardings.get(name))
    return unflatten(flat)


TRITON_GEMM_ENV = "HARMJAX_SCAN_TRITON_GEMM"


def compiler_options(mesh: Mesh) -> tuple[tuple[str, Any], ...]:
    """XLA options of the scan programs, as hashable pairs (empty: XLA's defaults).

    On GPUs the scans' GEMMs go through cuBLAS rather than XLA's Triton GEMM fusions. Measured
    on 2 x H200 under tensor 2 at 14B: the harm step 2.6-3.4% faster and the retain step
    2.3-2.4%, with 6-8 s less compilation (fewer candidates to autotune; BUILD_NOTES). Only the scan programs get it:
    the same option made 32B decoding at batch 1 10% slower. $HARMJAX_SCAN_TRITON_GEMM: "auto"
    (default, as above), "1" (XLA's default everywhere), "0" (cuBLAS on every backend).
    """
    value = os.environ.get(TRITON_GEMM_ENV, "auto")
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{TRITON_GEMM_ENV} must be auto, 0 or 1, got {value!r}.")
    if value == "1" or (value == "auto" and mesh.devices.flat[0].platform != "gpu"):
        return ()
    return (("xla_gpu_enable_triton_gemm", False),)


def jit_accumulate(
    config: ModelConfig, mesh: Mesh, names: tuple[str, ...], kind, remat: bool = False, chunk: int = 8,
    fused_abs: bool = True, layerwise: bool = False,
):
    """The jitted step f(params, accs, input_ids, attention_mask, loss_mask) -> (accs, loss_sum).

    `accs` is donated and updated in place; `loss_sum` is the sum over the batch of each
    example's mean response NLL (filler rows contribute 0). `fused_abs=False` keeps the
    retain kind on XLA's per-example blocks even where the fused kernel applies
    (`harmjax.attribution.abs_kernel`; benchmarks compare the two). `layerwise=True` runs the
    same step as one small program per decoder block instead of one program for the whole
    pass (`harmjax.attribution.layerwise`: compiles one block instead of all of them).
    """
    # The kernel setting (HARMJAX_ABS_KERNEL) is part of the cache key, so a changed setting
    # builds and traces a new step instead of reusing one built for the old setting.
    kernel = abs_kernel.mode() if fused_abs else "off"
    options = compiler_options(mesh)  # also part of the key
    if layerwise:
        return _layerwise(config, mesh, names, kind, remat, chunk, kernel, options)
    return _jit_accumulate(config, mesh, names, kind, remat, chunk, kernel, options)


@functools.lru_cache(maxsize=16)
def _layerwise(config, mesh, names, kind, remat, chunk, kernel, options):
    from harmjax.attribution.layerwise import LayerwiseStep

    return LayerwiseStep(config, mesh, names, kind, remat, chunk, kernel, dict(options))


@functools.lru_cache(maxsize=16)
def _jit_accumulate(config: ModelConfig, mesh: Mesh, names: tuple[str, ...], kind, remat: bool, chunk: int,
                    kernel: str, options: tuple[tuple[str, Any], ...]):
    mode = accumulator_mode(kind)
    # The probes carry the kernel choice in their static fields (the accumulator sharding, or
    # None for XLA's path): remat'd layers cache their backward per static fields, so the
    # choice must live there and not only inside the backward rule.
    flat_acc_sh = flatten(scope_shardings(config, mesh, names)) if mode == "abs" and kernel != "off" else None

    def loss_fn(accs, params, input_ids, attention_mask, loss_mask):
        probed = _probe(params, accs, mode, chunk, flat_acc_sh)
        logits = forward(probed, config, input_ids, attention_mask, remat=remat)
        return mean_nll_per_example(logits, input_ids, loss_mask).sum()

    def step(params, accs, input_ids, attention_mask, loss_mask):
        loss, new_accs = jax.value_and_grad(loss_fn)(accs, params, input_ids, attention_mask, loss_mask)
        return new_accs, loss

    acc_sh = _per_mode(mode, lambda: scope_shardings(config, mesh, names))
    batch = batch_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(param_shardings(config, mesh), acc_sh, batch, batch, batch),
        out_shardings=(acc_sh, replicated(mesh)),
        donate_argnums=(1,),
        compiler_options=dict(options) or None,
    )


def step_bytes(step, params, accs, input_ids, attention_mask, loss_mask) -> int:
    """Per-device bytes a `jit_accumulate` step needs on these (abstract or concrete) arguments,
    from XLA's estimate: of its one program, or of each per-block program (`LayerwiseStep`).
    Compiles the step (its own calls reuse the compilation)."""
    from harmjax.memory import program_bytes

    if hasattr(step, "needed_bytes"):
        return step.needed_bytes(params, accs, input_ids, attention_mask, loss_mask)
    return program_bytes(step.lower(params, accs, input_ids, attention_mask, loss_mask).compile())


def _clear_steps() -> None:
    _jit_accumulate.cache_clear()
    _layerwise.cache_clear()


jit_accumulate.cache_clear = _clear_steps  # tests start from no compiled steps


def finalize(kind: str, weight: jax.Array, acc: jax.Array) -> jax.Array:
    """The score of one matrix from its weight and accumulator (see the module docstring)."""
    w = weight.astype(jnp.float32)
    if kind == "harm":
        return -w * acc
    if kind == "retain":
        return jnp.abs(w) * acc
    if kind == "retain_mean":
        return jnp.abs(w * acc)
    raise ValueError(f"Unknown score kind {kind!r}; choose one of {KINDS}.")


@functools.lru_cache(maxsize=16)
def jit_finalize(config: ModelConfig, mesh: Mesh, names: tuple[str, ...], kind):
    """Jitted f(params, accs) -> scores over the scored leaves (accumulators donated); for a
    tuple of kinds, {kind: scores}."""
    mode = accumulator_mode(kind)
    acc_sh = scope_shardings(config, mesh, names)

    def one(k, flat_params, accs):
        if mode == "both":
            accs = accs["abs" if k == "retain" else "signed"]
        return unflatten({n: finalize(k, flat_params[n], a) for n, a in flatten(accs).items()})

    def scores(params, accs):
        flat = flatten(params)
        if isinstance(kind, str):
            return one(kind, flat, accs)
        return {k: one(k, flat, accs) for k in kind}

    return jax.jit(
        scores,
        in_shardings=(param_shardings(config, mesh), _per_mode(mode, lambda: acc_sh)),
        out_shardings=acc_sh if isinstance(kind, str) else {k: acc_sh for k in kind},
        donate_argnums=(1,),
    )


def names_for(config: ModelConfig, scope) -> tuple[str, ...]:
    """Hashable tuple of scored names (for the jit caches)."""
    return tuple(scored_names(config, scope))
