"""What every attribution path shares: score kinds, accumulator modes, probes, the scope
resolver, the scan programs' compiler options and the step interface.

Three paths use it: the whole-model scan step (`harmjax.attribution.step`), the same step as
per-block programs (`harmjax.attribution.layerwise`) and `attribute` for any JAX/Flax model
(`harmjax.attribution.any_model`).

KINDS and what they accumulate / return (W = the weight, L_i = mean response NLL of example i,
x_t = the input of W's linear map at token t):
  harm:         G = sum_i dL_i/dW          -> -W * G          (signed SNIP)
  retain:       A = sum_i |dL_i/dW|        -> |W| * A         (released code's utility score)
  retain_mean:  G = sum_i dL_i/dW          -> |W * G|         (the paper text's utility score)
  wanda:        X = sum_t x_t^2 (1, in)    -> |W| * sqrt(X)   (Wanda: |W_oj| * ||X_j||_2)
  magnitude:    nothing                    -> |W|             (reads no data)
Everything is float32 whatever the parameter dtype. Sums over examples make every score
independent of batch size and of how the batch is split over devices. wanda's tokens are every
non-padding token of every example, prompt and response (Wanda's "all calibration tokens";
padding and filler rows never count): it is a property of the activations the model sees, not
of the response loss.

`kind` may also be a tuple of kinds, e.g. ("retain", "harm") on a benign set: one backward pass
then accumulates what all of them need (both G and A when they differ, as {"abs", "signed"}
accumulator trees) and the scores come back as {kind: tree}. The accumulator layout is named
by a mode (`accumulator_mode`): the gradient part "signed", "abs", "both" or "none", plus
"+act" when wanda's input sums ride along ("act" alone for wanda without gradient kinds);
`statistics_of`, `accumulator_parts` and `from_parts` translate between a mode's layout and
{statistic: tree}.

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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from harmjax.attribution.probes import ProbedWeight
from harmjax.config import ModelConfig
from harmjax.errors import ScoreKindError
from harmjax.model.param_specs import param_specs, scorable_matrices
from harmjax.sharding import param_shardings
from harmjax.tree import flatten, iter_leaves, unflatten

KINDS = ("harm", "retain", "retain_mean", "wanda", "magnitude")
DEFAULT_SCOPE = ("model.layers.*.self_attn.*_proj.weight", "model.layers.*.mlp.*_proj.weight")
TRITON_GEMM_ENV = "HARMJAX_SCAN_TRITON_GEMM"

Scope = Sequence[str] | Callable[[str, Any], bool] | None

# The statistic each kind's score is made from; None: the weight alone.
_STATISTIC = {"harm": "signed", "retain": "abs", "retain_mean": "signed", "wanda": "act", "magnitude": None}
_GRAD_STATISTICS = {"signed": ("signed",), "abs": ("abs",), "both": ("abs", "signed"), "none": ()}

# -- kinds and accumulator modes ------------------------------------------------------------


def check_kinds(kind) -> tuple[str, ...]:
    """`kind` (one name or a tuple of names) as a tuple of distinct known kinds; ScoreKindError
    (a ValueError) else."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    for k in kinds:
        if k not in KINDS:
            raise ScoreKindError(f"Unknown score kind {k!r}; choose one of {KINDS}.")
    if not kinds or len(set(kinds)) != len(kinds):
        raise ScoreKindError(f"Score kinds must be one or more distinct names of {KINDS}; got {kind!r}.")
    return kinds


def statistic(kind: str) -> str | None:
    """The accumulated statistic a kind's score is made from: "abs", "signed", "act" (sums of
    squared inputs) or None (magnitude: the weight alone)."""
    return _STATISTIC[check_kinds(kind)[0]]


def accumulator_mode(kind) -> str:
    """The accumulator layout of a kind or tuple of kinds: "signed" (plain gradient sums), "abs"
    (per-example absolute gradients), "both", or "none" (no gradient statistic), with "+act"
    appended when wanda's input sums are needed too ("act" when they are all)."""
    stats = {statistic(k) for k in check_kinds(kind)} - {None}
    grads = stats - {"act"}
    grad = "none" if not grads else grads.pop() if len(grads) == 1 else "both"
    if "act" not in stats:
        return grad
    return "act" if grad == "none" else grad + "+act"


def grad_mode(mode: str) -> str:
    """The gradient part of a mode: "signed", "abs", "both" or "none" (what `ProbedWeight` takes)."""
    return "none" if mode == "act" else mode.removesuffix("+act")


def _grad_statistics(mode: str) -> tuple[str, ...]:
    # A gradient mode the library does not know (a benchmark's experimental probe mode) is one
    # tree of its own name.
    grad = grad_mode(mode)
    return _GRAD_STATISTICS.get(grad, (grad,))


def statistics_of(mode: str) -> tuple[str, ...]:
    """The statistics a mode accumulates, in layout order (e.g. ("abs", "signed", "act"))."""
    return _grad_statistics(mode) + (("act",) if mode.endswith("act") else ())


def from_parts(mode: str, parts: dict[str, Any]) -> Any:
    """The mode's accumulator layout from {statistic: tree}: one gradient statistic is the tree
    itself, two are {"abs", "signed"} (the layouts older scan checkpoints hold); with act,
    {"grad": <that>, "act": tree} ({"act": tree} without gradient statistics); "none": {}."""
    grads = _grad_statistics(mode)
    grad = {s: parts[s] for s in grads} if len(grads) == 2 else parts[grads[0]] if grads else None
    if not mode.endswith("act"):
        return {} if grad is None else grad
    return {"act": parts["act"]} if grad is None else {"grad": grad, "act": parts["act"]}


def accumulator_parts(mode: str, accs: Any) -> dict[str, Any]:
    """{statistic: tree} out of a mode's accumulator layout (the inverse of `from_parts`)."""
    grads = _grad_statistics(mode)
    grad = accs.get("grad") if mode.endswith("act") else accs
    parts = {s: grad[s] for s in grads} if len(grads) == 2 else {grads[0]: grad} if grads else {}
    return {**parts, "act": accs["act"]} if mode.endswith("act") else parts


def per_mode(mode: str, tree_fn: Callable[[], Any], act_fn: Callable[[], Any] | None = None) -> Any:
    """The mode's accumulator layout with `tree_fn()` for each gradient statistic and `act_fn()`
    for the input sums (e.g. in "both" mode {"abs": tree_fn(), "signed": tree_fn()})."""
    return from_parts(mode, {s: act_fn() if s == "act" else tree_fn() for s in statistics_of(mode)})


def accumulator_of(kind: str, mode: str, accs: Any) -> Any:
    """The accumulators `kind`'s score is made from, out of a `per_mode` tree (None for magnitude)."""
    s = statistic(kind)
    return None if s is None else accumulator_parts(mode, accs)[s]


def act_shape(shape: Sequence[int]) -> tuple[int, int]:
    """Shape of a wanda accumulator of an (out, in) weight: (1, in). Rank 2 like the weight, so
    it shards like the weight's input dimension and broadcasts against it in `finalize`."""
    return (1, int(shape[-1]))


def act_sharding(weight_sharding: NamedSharding) -> NamedSharding:
    """A wanda accumulator's sharding: the weight's, with the output dimension whole."""
    spec = tuple(weight_sharding.spec) + (None,) * 2
    return NamedSharding(weight_sharding.mesh, P(None, spec[1]))


def finalize(kind: str, weight: jax.Array, acc: jax.Array | None) -> jax.Array:
    """The score of one matrix from its weight and accumulator (see the module docstring)."""
    w = weight.astype(jnp.float32)
    if kind == "harm":
        return -w * acc
    if kind == "retain":
        return jnp.abs(w) * acc
    if kind == "retain_mean":
        return jnp.abs(w * acc)
    if kind == "wanda":
        return jnp.abs(w) * jnp.sqrt(acc)
    if kind == "magnitude":
        return jnp.abs(w)
    raise ScoreKindError(f"Unknown score kind {kind!r}; choose one of {KINDS}.")


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


def act_shardings(config: ModelConfig, mesh: Mesh, names: Sequence[str]) -> dict[str, Any]:
    """`act_sharding` of each scored leaf (the wanda accumulators)."""
    return jax.tree.map(act_sharding, scope_shardings(config, mesh, names))


# -- probes ---------------------------------------------------------------------------------


def probe_params(params: dict[str, Any], accs: Any, mode: str, chunk: int,
                 shardings: dict[str, Any] | None = None, token_mask: jax.Array | None = None) -> dict[str, Any]:
    """params with each scored weight replaced by a ProbedWeight carrying its accumulators (and,
    given `shardings`, the accumulator's sharding, which lets "abs" mode use the fused kernel).
    `token_mask` (batch, length), 1 for the tokens wanda's input sums count (see the module
    docstring), is handed to the probes in act modes."""
    shardings = shardings or {}
    parts = {s: flatten(t) for s, t in accumulator_parts(mode, accs).items()}
    acts = parts.pop("act", {})
    grad = grad_mode(mode)
    flat = flatten(params)
    for name in next(iter(parts.values()), acts):
        if grad == "both":
            acc = (parts["abs"][name], parts["signed"][name])
        else:
            acc = parts[grad][name] if parts else None
        flat[name] = ProbedWeight(flat[name], acc, grad, chunk, None if grad == "both" else shardings.get(name),
                                  act=acts.get(name), token_mask=token_mask if acts else None)
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
