"""Selection: from harm (and retain) score trees to a bool mask of weights to prune.

For each matrix M (the reference's semantics, Orgad et al. / Wei et al.):
  T_q = the floor(q*|M|) entries with the largest harm score,
  T_p = the floor(p*|M|) entries with the largest retain score,
  mask = T_q \\ T_p.
In a mixture-of-experts checkpoint with one leaf per expert, M is a layer's experts of one
matrix kind taken together (`harmjax.masks.groups`), as gpt-oss' fused (E, ., .) tensors are:
ties there go by (expert index, row-major index), and the masks keep the per-expert names.
`granularity="row"` does the same within each output row (|M| -> in_features) and
`granularity="global"` takes one top floor(q*N) over all N scored weights (and one global
T_p). Ties are broken by the lowest flat index: row-major within a matrix, and for global
selection leaves in HF parameter order (layer 0..L-1, then q, k, v, o, gate, up, down), so
the result equals a stable sort on (-score, index). -0.0 ties with +0.0; NaN ranks below
every number (selected only when k exceeds the non-NaN count).

Controls: `sign_flip=True` ranks by -harm (the opposite-sign weights). `skip_first=True`
replaces T_q by the entries ranked (k, 2k] (the next slice after the top k), for the
"skip the first top-q slice" control; T_p is unchanged.

Nothing is sorted: scores map to order-preserving uint32 keys and the k-th largest key is
found by counting passes (`harmjax.masks.select_keys`). The engines, chosen per call:
  - `select_device`: one loop program per leaf (matrix and row selection), on the devices
    that hold the scores, keeping their sharding;
  - `select_host`: NumPy's partition for a matrix whose scores are on the host;
  - `select_global`: the global threshold planned on the host (one counting program per
    layer on accelerators, one over every leaf on CPU), then each layer's masks.
The few distinct programs a model needs (one per leaf shape) are compiled side by side on
threads before the first leaf runs (`select_compile.precompile`). See docs/design.md
"Selection" and docs/measurements.md "Selection".
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from harmjax.masks.algebra import MaskMismatchError, check_same_structure, hf_sorted_leaves
from harmjax.masks.groups import expert_groups
from harmjax.masks.select_compile import colocate, on_host, precompile, sharding_of, signature, wait_if_collective
from harmjax.masks.select_device import leaf_selector, loop_jobs
from harmjax.masks.select_global import select_global
from harmjax.masks.select_host import in_numpy, select_group_host, select_leaf_host
from harmjax.masks.select_keys import INT32_MAX, as_2d_shape, top_count
from harmjax.tree import unflatten

GRANULARITIES = ("matrix", "row", "global")


def select(harm: Mapping[str, Any], retain: Mapping[str, Any] | None = None, *, q: float, p: float = 0.0,
           granularity: str = "matrix", sign_flip: bool = False, skip_first: bool = False,
           progress: bool = True) -> dict[str, Any]:
    """The mask T_q(harm) \\ T_p(retain): weights to prune, as a bool tree like `harm`.

    Args:
      harm: score tree (float leaves, the params' structure restricted to scored weights);
        jax.Arrays (sharded or not) or NumPy arrays.
      retain: score tree of the same structure and shapes, or None for no T_p subtraction.
      q: fraction of each matrix (row, or of all scored weights for "global") taken by harm;
        a MoE layer's per-expert leaves of one kind count as one matrix (module doc).
      p: fraction taken by retain; those weights are spared.
      granularity: "matrix" (per weight matrix, the reference), "row" (per output row) or
        "global" (one top-k over every scored weight).
      sign_flip: rank by -harm (control: weights whose removal would lower the harm loss).
      skip_first: take the harm ranks (k, 2k] instead of the top k (control).
      progress: show a tqdm bar over leaves.

    Returns:
      A nested dict of bool arrays with `harm`'s structure, each with its score's sharding.
      Selection is exact: equal to a stable sort on (-score, flat index), see module doc.
    """
    return unflatten(dict(iter_select(harm, retain, q=q, p=p, granularity=granularity, sign_flip=sign_flip,
                                      skip_first=skip_first, progress=progress)))


def iter_select(harm: Mapping[str, Any], retain: Mapping[str, Any] | None = None, *, q: float, p: float = 0.0,
                granularity: str = "matrix", sign_flip: bool = False, skip_first: bool = False,
                progress: bool = True) -> Iterator[tuple[str, Any]]:
    """`select`'s mask one leaf at a time: (dotted HF name, bool leaf) pairs in HF order.

    The arguments are `select`'s and are checked before the first pair. A consumer that
    drops each leaf after use (`harmjax.masks.sparse.top_candidates`) holds at most one
    layer's masks, not the dense tree (31 GB at 32B)."""
    q, p, harm_items, retain_flat = check_arguments(harm, retain, q, p, granularity)
    return iter_checked(harm_items, retain_flat, q, p, granularity, sign_flip, skip_first, progress)


def check_arguments(harm, retain, q, p, granularity):
    """`select`'s arguments checked: (q, p, harm's (name, leaf) pairs in HF order, retain's
    {name: leaf} on the harm leaves' devices, or None), the inputs of `iter_checked`.

    Raises ValueError (a fraction outside [0, 1], an unknown granularity, a leaf of 2**31
    entries or more) and MaskMismatchError (trees that differ, non-float scores)."""
    q = _check_fraction("q", q)
    p = _check_fraction("p", p)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    if retain is not None:
        check_same_structure(harm, retain, what="harm and retain score trees")
    harm_items = hf_sorted_leaves(harm)
    retain_flat = dict(hf_sorted_leaves(retain)) if retain is not None else None
    for name, leaf in harm_items:
        _check_leaf(name, leaf, "Harm")
        if retain_flat is not None:
            _check_leaf(name, retain_flat[name], "Retain")
            retain_flat[name] = colocate(retain_flat[name], sharding_of(leaf))
    return q, p, harm_items, retain_flat


def iter_checked(harm_items, retain_flat, q, p, granularity, flip, skip, progress,
                 extra_jobs=None) -> Iterator[tuple[str, Any]]:
    """`iter_select` on `check_arguments`' output (flip and skip are `sign_flip` and
    `skip_first`). `extra_jobs` ({signature: (jitted function, example arguments)}, matrix
    and row granularity) are compiled together with the loop programs: the sparse
    candidates' packing and gathering."""
    if not harm_items:
        return
    if granularity == "global":
        yield from select_global(harm_items, retain_flat, q, p, flip, skip, progress)
        return
    per_row = granularity == "row"
    # Rows are rows in either expert layout; only whole matrices are grouped.
    groups = {} if per_row else expert_groups(name for name, _ in harm_items)
    singles = [(name, h) for name, h in harm_items if name not in groups]
    precompile({**loop_jobs(singles, retain_flat, per_row), **(extra_jobs or {})})
    pending: dict[str, Any] = {}  # a group's masks, selected at its first leaf in HF order
    compiled: set = set()
    flat = dict(harm_items)
    for name, h in tqdm(harm_items, desc="select", unit="matrix", disable=not progress, leave=False):
        if name in groups:
            if name not in pending:
                pending.update(_select_group([(n, flat[n]) for n in groups[name]], retain_flat, q, p, flip, skip,
                                             compiled))
            yield name, pending.pop(name)
            continue
        n = as_2d_shape(h.shape)[1] if per_row else int(h.size)
        kq = top_count(q, n)
        r = retain_flat.get(name) if retain_flat is not None else None
        if in_numpy(h, r, per_row):
            yield name, select_leaf_host(h, r, kq, min(2 * kq, n), top_count(p, n), flip, skip)
            continue
        yield name, wait_if_collective(leaf_selector(sharding_of(h), per_row)(
            h, r, np.int32(kq), np.int32(min(2 * kq, n)), np.int32(top_count(p, n)), np.bool_(flip), np.bool_(skip),
        ))


def _select_group(items, retain_flat, q, p, flip, skip, compiled: set) -> dict[str, Any]:
    """{name: mask} of one expert group (`items` in expert order) ranked as one matrix: in
    NumPy when every score is on the host, else by the global engine restricted to the group
    (exact int64 counts over its leaves, ties by leaf order then flat index). `compiled`
    collects the signatures whose programs are already compiled."""
    names, hs = [n for n, _ in items], [h for _, h in items]
    rs = [retain_flat[n] for n in names] if retain_flat is not None else None
    n = sum(int(h.size) for h in hs)
    kq = top_count(q, n)
    if all(on_host(x) for x in hs + (rs or [])):
        return dict(zip(names, select_group_host(hs, rs, kq, min(2 * kq, n), top_count(p, n), flip, skip)))
    key = signature(*hs) + signature(*(rs or ()))
    sub_retain = dict(zip(names, rs)) if rs is not None else None
    out = dict(select_global(items, sub_retain, q, p, flip, skip, False, compile_first=key not in compiled))
    compiled.add(key)
    return out


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value}.")
    return value


def _check_leaf(name: str, leaf: Any, what: str) -> None:
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise MaskMismatchError(f"{what} score {name!r} has dtype {leaf.dtype}; scores must be floating point.")
    if leaf.size > INT32_MAX:
        raise ValueError(
            f"{what} score {name!r} has {leaf.size} entries; selection counts in int32 per "
            "leaf and supports leaves of fewer than 2**31 entries."
        )
