"""What every attribution path shares: score kinds, accumulator modes, probes, the scope
resolver, the scan programs' compiler options and the step interface.

Three paths use it: the whole-model scan step (`harmjax.attribution.step`), the same step as
per-block programs (`harmjax.attribution.layerwise`) and `attribute` for any JAX/Flax model
(`harmjax.attribution.any_model`).

KINDS and what they accumulate / return (W = the weight, L_i = mean response NLL of example i):
  harm:         G = sum_i dL_i/dW          -> -W * G          (signed SNIP)
  retain:       A = sum_i |dL_i/dW|        -> |W| * A         (released code's utility score)
  retain_mean:  G = sum_i dL_i/dW          -> |W * G|         (the paper text's utility score)
Everything is float32 whatever the parameter dtype. Sums over examples make every score
independent of batch size and of how the batch is split over devices.

`kind` may also be a tuple of kinds, e.g. ("retain", "harm") on a benign set: one backward pass
then accumulates what all of them need (both G and A when they differ, as {"abs", "signed"}
accumulator trees) and the scores come back as {kind: tree}.

The scope (which weights are scored) is a sequence of fnmatch patterns over dotted names, e.g.
`("model.layers.*.mlp.*_proj.weight",)` or `("model.layers.1[0-5].*",)`, or a predicate
`(name, leaf) -> bool`; `resolve_scope` is the one resolver, `scored_names` (harmjax models:
linear decoder weights only, default `DEFAULT_SCOPE`, the method's seven projections of every
block; for mixture-of-experts families the paper's "every linear inside the decoder blocks":
q/k/v/o, every expert matrix and the router, which a scope such as
`("model.layers.*.self_attn.*_proj.weight", "model.layers.*.experts.*")` drops; expert
biases and gpt-oss' sinks are not linear weights and are never scored) and `scoped_names` (any params pytree: default every floating matrix) apply it.
"""

from __future__ import annotations

import abc
import fnmatch
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from harmjax.attribution.probes import ProbedWeight
from harmjax.config import ModelConfig
from harmjax.model.param_specs import param_specs, scorable_matrices
from harmjax.sharding import param_shardings
from harmjax.tree import flatten, iter_leaves, unflatten

KINDS = ("harm", "retain", "retain_mean")
DEFAULT_SCOPE = ("model.layers.*.self_attn.*_proj.weight", "model.layers.*.mlp.*_proj.weight")
TRITON_GEMM_ENV = "HARMJAX_SCAN_TRITON_GEMM"

Scope = Sequence[str] | Callable[[str, Any], bool] | None

# -- kinds and accumulator modes ------------------------------------------------------------


def check_kinds(kind) -> tuple[str, ...]:
    """`kind` (one name or a tuple of names) as a tuple of distinct known kinds; ValueError else."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"Unknown score kind {k!r}; choose one of {KINDS}.")
    if not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"Score kinds must be one or more distinct names of {KINDS}; got {kind!r}.")
    return kinds


def statistic(kind: str) -> str:
    """The accumulated statistic a kind's score is made from: "abs" or "signed"."""
    return "abs" if kind == "retain" else "signed"


def accumulator_mode(kind) -> str:
    """"abs" for per-example absolute gradients, "signed" for plain gradient sums, "both" when
    a tuple of kinds needs the two."""
    modes = {statistic(k) for k in check_kinds(kind)}
    return modes.pop() if len(modes) == 1 else "both"


def per_mode(mode: str, tree_fn: Callable[[], Any]) -> Any:
    """`tree_fn()`, or in "both" mode {"abs": tree_fn(), "signed": tree_fn()} (one accumulator
    tree per statistic)."""
    return {"abs": tree_fn(), "signed": tree_fn()} if mode == "both" else tree_fn()


def accumulator_of(kind: str, mode: str, accs: Any) -> Any:
    """The accumulators `kind`'s score is made from, out of a `per_mode` tree."""
    return accs[statistic(kind)] if mode == "both" else accs


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


# -- scope ----------------------------------------------------------------------------------


def resolve_scope(leaves: Iterable[tuple[str, Any]], scope: str | Sequence[str] | Callable[[str, Any], bool], *,
                  what: str = "leaf of the params", allowed: Callable[[str], bool] | None = None,
                  refusal: str = "") -> list[str]:
    """Names of `leaves` ((dotted name, leaf) pairs) that `scope` selects, in their order.

    `scope` is fnmatch patterns (one string or a sequence) or a predicate `(name, leaf) -> bool`.
    ValueError when a pattern matches no leaf, when a chosen name fails `allowed` (the message
    then says it `refusal`), or when nothing is chosen; `what` names a leaf in the messages.
    """
    leaves = list(leaves)
    if callable(scope):
        rules = [("The scope predicate", scope, False)]
    else:
        patterns = (scope,) if isinstance(scope, str) else tuple(scope)
        rules = [(f"Scope pattern {p!r}", lambda n, _, p=p: fnmatch.fnmatchcase(n, p), True) for p in patterns]
    chosen: set[str] = set()
    for label, rule, must_match in rules:
        hits = [n for n, x in leaves if rule(n, x)]
        if must_match and not hits:
            example = leaves[0][0] if leaves else "(no leaves)"
            raise ValueError(f"{label} matches no {what} (names look like {example!r}).")
        bad = [n for n in hits if allowed is not None and not allowed(n)]
        if bad:
            raise ValueError(f"{label} matches {bad[0]!r}, which {refusal}.")
        chosen.update(hits)
    names = [n for n, _ in leaves if n in chosen]
    if not names:
        raise ValueError(f"The attribution scope selects no {what}.")
    return names


def scored_names(config: ModelConfig, scope: Sequence[str] | None = None) -> list[str]:
    """HF names of the weights a scan of this model scores, in HF parameter order.

    `scope`: fnmatch patterns over HF names (None or empty: `DEFAULT_SCOPE`); only the 2-D
    linear weights of decoder blocks may be scored. Raises ValueError when a pattern matches
    nothing or matches another parameter.
    """
    linear = set(scorable_matrices(config))
    # MoE: every scorable matrix, as a predicate (thousands of expert names as patterns would
    # cost a quadratic match).
    default = DEFAULT_SCOPE if not config.num_experts else (lambda name, _: name in linear)
    return resolve_scope(param_specs(config).items(), scope or default,
                         what=f"parameter of this {config.model_type} model", allowed=linear.__contains__,
                         refusal="is not a decoder linear weight; only attention, MLP, expert and router "
                                 "matrices can be scored")


def names_for(config: ModelConfig, scope) -> tuple[str, ...]:
    """`scored_names` as a hashable tuple (for the jit caches)."""
    return tuple(scored_names(config, scope))


def floating_matrix(name: str, leaf: Any) -> bool:
    """`scoped_names`' default: a floating-point leaf with at least 2 dimensions."""
    del name
    return bool(jnp.issubdtype(jnp.result_type(leaf), jnp.floating) and np.ndim(leaf) >= 2)


def scoped_names(params: Any, scope: Scope = None) -> list[str]:
    """Dotted names of the leaves of `params` that `attribute` scores.

    `scope` is None (every floating-point leaf with at least 2 dimensions: the weight
    matrices, and also embeddings, which a user may want to exclude), a sequence of fnmatch
    patterns over dotted names (e.g. `("layers.*.kernel",)`), or a predicate
    `(name, leaf) -> bool`. Raises ValueError when nothing matches, or when a pattern matches
    nothing.
    """
    return resolve_scope(iter_leaves(params), floating_matrix if scope is None else scope)


def scope_shardings(config: ModelConfig, mesh: Mesh, names: Sequence[str]) -> dict[str, Any]:
    """The params' shardings restricted to the scored leaves (accumulators and scores use them)."""
    flat = flatten(param_shardings(config, mesh))
    return unflatten({n: flat[n] for n in names})


# -- probes ---------------------------------------------------------------------------------


def probe_params(params: dict[str, Any], accs: dict[str, Any], mode: str, chunk: int,
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


# -- the scan programs ----------------------------------------------------------------------


def compiler_options(mesh: Mesh) -> tuple[tuple[str, Any], ...]:
    """XLA options of the scan programs, as hashable pairs (empty: XLA's defaults).

    On GPUs the scans' GEMMs go through cuBLAS rather than XLA's Triton GEMM fusions: faster
    steps and less compilation (fewer candidates to autotune; docs/measurements.md "Scans at 14B and 32B").
    Only the scan programs get it: the same option slowed down decoding.
    $HARMJAX_SCAN_TRITON_GEMM: "auto" (default, as above), "1" (XLA's default everywhere),
    "0" (cuBLAS on every backend).
    """
    value = os.environ.get(TRITON_GEMM_ENV, "auto")
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{TRITON_GEMM_ENV} must be auto, 0 or 1, got {value!r}.")
    if value == "1" or (value == "auto" and mesh.devices.flat[0].platform != "gpu"):
        return ()
    return (("xla_gpu_enable_triton_gemm", False),)


class AccumulateStep(abc.ABC):
    """One accumulation step of a scan, however it is compiled: the whole pass as one program
    (`step.WholeStep`) or as per-block programs (`layerwise.LayerwiseStep`).

    Calling it with (params, accs, input_ids, attention_mask, loss_mask) returns (accs,
    loss_sum): `accs` is donated and updated in place; `loss_sum` is the sum over the batch of
    each example's mean response NLL (filler rows contribute 0).
    """

    @abc.abstractmethod
    def __call__(self, params, accs, input_ids, attention_mask, loss_mask) -> tuple[Any, jax.Array]:
        """One accumulation step (see the class docstring)."""

    @abc.abstractmethod
    def needed_bytes(self, params, accs, input_ids, attention_mask, loss_mask) -> int:
        """Per-device bytes a step needs on these (abstract or concrete) arguments, from XLA's
        estimates; compiles the step (its own calls reuse the compilation)."""
