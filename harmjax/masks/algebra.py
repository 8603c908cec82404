"""Masks as plain values: boolean algebra, overlap and counts over bool pytrees.

A mask is a nested dict with the params' structure restricted to the scored leaves
(`mask["model"]["layers"]["3"]["mlp"]["down_proj"]["weight"]`), each leaf a bool array of
the weight's shape; True means pruned. Every operation here returns a new tree and never
changes its inputs, so masks compose in a notebook like sets:

  shared = intersect_all([mask_cyber, mask_bio, mask_violence])
  only_cyber = difference(mask_cyber, shared)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harmjax.distributed import to_host
from harmjax.errors import HarmjaxError
from harmjax.tree import iter_leaves, unflatten

Tree = Mapping[str, Any]

# Relative names inside a decoder block, in `layer_param_specs` order (the 7 scored
# projections first), so that global selection and reports follow HF's parameter order.
_LAYER_ORDER = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.qkv_proj.weight",  # Phi-3's fused projections
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.gate_up_proj.weight",
    "mlp.down_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.bias",
    "mlp.gate_proj.bias",
    "mlp.up_proj.bias",
    "mlp.down_proj.bias",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight",
)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_TOP_ORDER = {"model.embed_tokens.weight": 0, "model.norm.weight": 2, "lm_head.weight": 3}


class MaskMismatchError(HarmjaxError, ValueError):
    """A mask or score tree does not fit the tree it is combined with: a path is missing,
    a shape differs, or a leaf has the wrong dtype."""


def hf_order_key(name: str) -> tuple:
    """Sort key putting dotted HF names in `param_specs` order: embeddings, then layers
    0..N-1 numerically (q, k, v, o, gate, up, down, biases, norms within a layer), then the
    final norm and lm_head; unknown names last, alphabetically."""
    match = _LAYER_RE.match(name)
    if match:
        rest = match.group(2)
        rank = _LAYER_ORDER.index(rest) if rest in _LAYER_ORDER else len(_LAYER_ORDER)
        return (1, int(match.group(1)), rank, rest)
    top = _TOP_ORDER.get(name, 4)
    return (top, 0, 0, name)


def hf_sorted_leaves(tree: Tree) -> list[tuple[str, Any]]:
    """(dotted name, leaf) pairs of `tree` in HF parameter order (see `hf_order_key`)."""
    return sorted(iter_leaves(tree), key=lambda item: hf_order_key(item[0]))


def check_same_structure(a: Tree, b: Tree, what: str = "masks") -> None:
    """Raises MaskMismatchError unless `a` and `b` have the same dotted names and leaf shapes;
    the message names the first path that differs."""
    flat_a, flat_b = dict(iter_leaves(a)), dict(iter_leaves(b))
    only_a = [n for n in flat_a if n not in flat_b]
    only_b = [n for n in flat_b if n not in flat_a]
    if only_a or only_b:
        first = (only_a or only_b)[0]
        side = "first" if only_a else "second"
        raise MaskMismatchError(
            f"The {what} do not have the same leaves: {first!r} is only in the {side} "
            f"({len(only_a)} names only in the first, {len(only_b)} only in the second)."
        )
    for name, leaf in flat_a.items():
        if tuple(np.shape(leaf)) != tuple(np.shape(flat_b[name])):
            raise MaskMismatchError(
                f"The {what} disagree at {name!r}: shape {tuple(np.shape(leaf))} in the first, "
                f"{tuple(np.shape(flat_b[name]))} in the second."
            )


def check_bool(tree: Tree, what: str) -> None:
    """Raises MaskMismatchError unless every leaf of `tree` is bool (`what` names the tree in
    the message)."""
    for name, leaf in iter_leaves(tree):
        if np.dtype(leaf.dtype) != np.bool_:
            raise MaskMismatchError(
                f"{what} leaf {name!r} has dtype {leaf.dtype}, expected bool "
                "(convert a 0/1 array with `x.astype(bool)`)."
            )


def _map(fn, *masks: Tree) -> dict[str, Any]:
    """Applies `fn` leafwise to masks of one structure, returning a new nested dict."""
    for i, m in enumerate(masks):
        check_bool(m, f"Mask #{i}")
    for m in masks[1:]:
        check_same_structure(masks[0], m)
    flats = [dict(iter_leaves(m)) for m in masks]
    return unflatten({name: fn(*(f[name] for f in flats)) for name in flats[0]})


def union(a: Tree, b: Tree) -> dict[str, Any]:
    """Weights pruned by `a` or by `b`."""
    return _map(jnp.logical_or, a, b)


def intersection(a: Tree, b: Tree) -> dict[str, Any]:
    """Weights pruned by both `a` and `b`."""
    return _map(jnp.logical_and, a, b)


def difference(a: Tree, b: Tree) -> dict[str, Any]:
    """Weights pruned by `a` but not by `b` (a \\ b)."""
    return _map(lambda x, y: jnp.logical_and(x, jnp.logical_not(y)), a, b)


def complement(a: Tree) -> dict[str, Any]:
    """Every scored weight that `a` does not prune."""
    return _map(jnp.logical_not, a)


def _fold(combine, masks: Sequence[Tree], name: str) -> dict[str, Any]:
    masks = list(masks)
    if not masks:
        raise ValueError(f"{name} needs at least one mask.")
    out = masks[0] if len(masks) > 1 else _map(lambda x: x, masks[0])
    for m in masks[1:]:
        out = combine(out, m)
    return out


def intersect_all(masks: Sequence[Tree]) -> dict[str, Any]:
    """Weights pruned by every mask in `masks` (e.g. weights shared by all harm types)."""
    return _fold(intersection, masks, "intersect_all")


def union_all(masks: Sequence[Tree]) -> dict[str, Any]:
    """Weights pruned by any mask in `masks`."""
    return _fold(union, masks, "union_all")


@jax.jit
def _leaf_counts(leaves: list[Any]) -> jax.Array:
    # One int32 count per leaf in one program (and one host transfer); a leaf holds fewer
    # than 2**31 entries, totals are summed on the host as Python ints.
    return jnp.stack([jnp.sum(x, dtype=jnp.int32) for x in leaves])


def leaf_true_counts(leaves: list[Any]) -> list[int]:
    """The number of True entries of each bool leaf, as Python ints (one program, one host
    transfer for all of them)."""
    if not leaves:
        return []
    return [int(c) for c in to_host(_leaf_counts(leaves))]


def count(mask: Tree) -> int:
    """Number of pruned (True) entries in `mask`."""
    return sum(leaf_true_counts([leaf for _, leaf in iter_leaves(mask)]))


def jaccard(a: Tree, b: Tree) -> float:
    """|a ∩ b| / |a ∪ b| of two masks of one structure; 1.0 when both are empty (equal sets)."""
    both = count(intersection(a, b))
    either = count(union(a, b))
    return 1.0 if either == 0 else both / either


def _layer_and_projection(name: str) -> tuple[str, str]:
    """('3', 'down_proj') for model.layers.3.mlp.down_proj.weight; a bias is 'down_proj.bias';
    a leaf outside the decoder blocks is its own module name as layer, e.g. ('lm_head', 'lm_head')."""
    parts = name.split(".")
    module, leaf = parts[-2] if len(parts) > 1 else parts[-1], parts[-1]
    projection = module if leaf == "weight" else f"{module}.{leaf}"
    match = _LAYER_RE.match(name)
    layer = match.group(1) if match else ".".join(parts[:-1])
    return layer, projection


def mask_counts(mask: Tree, params: Tree | None = None, num_params: int | None = None) -> dict[str, Any]:
    """Pruned-weight counts of a mask, for reports and `summary.json`.

    Returns a dict with `total` (pruned entries), `scored` (entries the mask covers),
    `fraction_scored`, `per_layer` {"0": n, ...}, `per_projection` {"q_proj": n, ...},
    `per_layer_projection` {"0": {"q_proj": n, ...}, ...} (layers and projections in HF
    order), and `num_params` / `fraction_params` (pruned as a fraction of all model
    parameters) when `params` or `num_params` is given, else None.
    """
    check_bool(mask, "Mask")
    items = hf_sorted_leaves(mask)
    counts = leaf_true_counts([leaf for _, leaf in items])
    if params is not None:
        num_params = param_count(params)
    return counts_summary([(name, tuple(leaf.shape), n) for (name, leaf), n in zip(items, counts)], num_params)


def param_count(params: Tree) -> int:
    """Number of parameters (entries of every leaf) of a params tree, as a Python int."""
    return sum(int(np.prod(np.shape(x), dtype=np.int64)) for x in jax.tree.leaves(params))


def counts_summary(items: Sequence[tuple[str, tuple[int, ...], int]], num_params: int | None = None) -> dict[str, Any]:
    """`mask_counts`' dict from (HF name, matrix shape, pruned count) triples in HF order: the
    one place the per-layer and per-projection tallies are made, for dense and sparse masks."""
    per_layer: dict[str, int] = {}
    per_projection: dict[str, int] = {}
    per_layer_projection: dict[str, dict[str, int]] = {}
    scored = 0
    for name, shape, n in items:
        layer, projection = _layer_and_projection(name)
        per_layer[layer] = per_layer.get(layer, 0) + n
        per_projection[projection] = per_projection.get(projection, 0) + n
        row = per_layer_projection.setdefault(layer, {})
        row[projection] = row.get(projection, 0) + n
        scored += int(np.prod(shape, dtype=np.int64))
    total = sum(n for _, _, n in items)
    return {
        "total": total,
        "scored": scored,
        "fraction_scored": total / scored if scored else 0.0,
        "num_params": num_params,
        "fraction_params": (total / num_params) if num_params else None,
        "per_layer": per_layer,
        "per_projection": per_projection,
        "per_layer_projection": per_layer_projection,
    }


def format_counts(counts: Mapping[str, Any]) -> str:
    """A short text table of `mask_counts` output: one line per layer, one column per projection."""
    projections = list(counts["per_projection"])
    header = ["layer", *projections, "total"]
    rows = [header]
    for layer, row in counts["per_layer_projection"].items():
        rows.append([layer, *(str(row.get(p, 0)) for p in projections), str(counts["per_layer"][layer])])
    rows.append(["all", *(str(counts["per_projection"][p]) for p in projections), str(counts["total"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    frac = f"pruned {counts['total']} of {counts['scored']} scored weights ({counts['fraction_scored']:.3e})"
    if counts.get("fraction_params") is not None:
        frac += f", {counts['fraction_params']:.3e} of all {counts['num_params']} parameters"
    return "\n".join([*lines, frac])

