"""Selection: from harm (and retain) score trees to a bool mask of weights to prune.

For each matrix M (the reference's semantics, Orgad et al. / Wei et al.):
  T_q = the floor(q*|M|) entries with the largest harm score,
  T_p = the floor(p*|M|) entries with the largest retain score,
  mask = T_q \\ T_p.
`granularity="row"` does the same within each output row (|M| -> in_features) and
`granularity="global"` takes one top floor(q*N) over all N scored weights (and one global
T_p). Ties are broken by the lowest flat index: row-major within a matrix, and for global
selection leaves in HF parameter order (layer 0..L-1, then q, k, v, o, gate, up, down), so
the result equals a stable sort on (-score, index). -0.0 ties with +0.0; NaN ranks below
every number (selected only when k exceeds the non-NaN count).

Controls: `sign_flip=True` ranks by -harm (the opposite-sign weights). `skip_first=True`
replaces T_q by the entries ranked (k, 2k] (the next slice after the top k), for the
"skip the first top-q slice" control; T_p is unchanged.

How it avoids sorting: each float32 score maps to a uint32 key with the same order
(`_sort_keys`). The k-th largest key is found bit by bit, most significant first, with one
count reduction per bit (32 passes, each a compare-and-sum that XLA fuses and, for a sharded
array, reduces locally and all-reduces a scalar). The entries equal to that key are then
cut at the right flat position by two more bisections (over rows, then columns) made of the
same count reductions. Nothing is gathered or sorted, so a 58M-entry matrix sharded over
devices stays sharded, and memory is a few temporaries of one leaf. Global selection runs
the same bisections with per-leaf counts summed on the host as exact Python integers (the
total may exceed 2**31).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from harmjax.distributed import to_host
from harmjax.masks.algebra import MaskMismatchError, check_same_structure, hf_sorted_leaves
from harmjax.tree import unflatten

GRANULARITIES = ("matrix", "row", "global")
_INT32_MAX = 2**31 - 1


def _sort_keys(x: jax.Array, flip: bool | jax.Array) -> jax.Array:
    """uint32 keys ordered like the float32 scores (descending score = descending key).

    Non-negative floats get the sign bit set, negative ones are bit-inverted: the standard
    radix-sort mapping. -0.0 is folded onto +0.0 (they tie, as in NumPy) and NaN maps to 0,
    below -inf (key 0x007fffff).
    """
    x = x.astype(jnp.float32)
    x = jnp.where(flip, -x, x)
    x = jnp.where(x == 0, jnp.float32(0), x)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    keys = jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))
    return jnp.where(jnp.isnan(x), jnp.uint32(0), keys)


def _count(pred: jax.Array, axis: int | None) -> jax.Array:
    return jnp.sum(pred, axis=axis, keepdims=axis is not None, dtype=jnp.int32)


def _kth_largest_key(keys: jax.Array, k: jax.Array, axis: int | None) -> jax.Array:
    """The k-th largest key (per row when axis=1): the largest t with count(keys >= t) >= k.

    Built bit by bit from the most significant; the predicate is monotone in t, so each
    bit is kept exactly when the count still reaches k. For k = 0 it returns 0xffffffff,
    which no key equals.
    """
    shape = () if axis is None else keys.shape[:-1] + (1,)

    def step(i, t):
        cand = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(_count(keys >= cand, axis) >= k, cand, t)

    return lax.fori_loop(0, 32, step, jnp.zeros(shape, jnp.uint32))


def _largest_below(limit: int, predicate, shape: tuple[int, ...]) -> jax.Array:
    """The largest integer x in [0, limit) with predicate(x) true (elementwise over `shape`),
    for a predicate that is true at 0 and monotone (true, then false); built bit by bit
    like `_kth_largest_key`."""
    nbits = max(1, (limit - 1).bit_length())

    def step(i, x):
        cand = x | (jnp.int32(1) << (nbits - 1 - i))
        return jnp.where((cand < limit) & predicate(cand), cand, x)

    return lax.fori_loop(0, nbits, step, jnp.zeros(shape, jnp.int32))


def _first_equal_matrix(equal: jax.Array, r: jax.Array) -> jax.Array:
    """The first `r` True entries of a 2-D `equal` in row-major order (none when r <= 0).

    Finds the row R holding the r-th True (largest R with fewer than r Trues above it),
    then the column C of the r-th True within R, and keeps Trues at or before (R, C).
    """
    rows_n, cols_n = equal.shape
    rows = lax.broadcasted_iota(jnp.int32, equal.shape, 0)
    cols = lax.broadcasted_iota(jnp.int32, equal.shape, 1)
    row_cut = _largest_below(rows_n, lambda x: _count(equal & (rows < x), None) < r, ())
    in_row = equal & (rows == row_cut)
    r_in_row = r - _count(equal & (rows < row_cut), None)
    col_cut = _largest_below(cols_n, lambda x: _count(in_row & (cols < x), None) < r_in_row, ())
    before = (rows < row_cut) | ((rows == row_cut) & (cols <= col_cut))
    return equal & before & (r > 0)


def _first_equal_rows(equal: jax.Array, r: jax.Array) -> jax.Array:
    """Per row, the first r[row] True entries of a 2-D `equal` (r has shape (rows, 1))."""
    cols_n = equal.shape[1]
    cols = lax.broadcasted_iota(jnp.int32, equal.shape, 1)
    col_cut = _largest_below(cols_n, lambda x: _count(equal & (cols < x), 1) < r, r.shape)
    return equal & (cols <= col_cut) & (r > 0)


def _top(keys: jax.Array, k: jax.Array, per_row: bool) -> jax.Array:
    """Bool mask of the k largest keys of a 2-D array (per row when per_row), ties by lowest
    row-major index."""
    axis = 1 if per_row else None
    t = _kth_largest_key(keys, k, axis)
    above = keys > t
    r = k - _count(above, axis)
    first = _first_equal_rows if per_row else _first_equal_matrix
    return above | first(keys == t, r)


def _as_2d(x: jax.Array) -> jax.Array:
    if x.ndim == 2:
        return x
    return x.reshape(1, -1) if x.ndim <= 1 else x.reshape(-1, x.shape[-1])


def _select_leaf(harm, retain, kq, kq_skip, kp, flip, skip, *, per_row):
    """T_q \\ T_p of one leaf, all in one program (no host round trip). `flip` and `skip` are
    traced booleans, so the controls reuse the same compilation."""
    shape = harm.shape
    keys = _sort_keys(_as_2d(harm), flip)
    selected = _top(keys, kq, per_row)
    # skip: ranks (k, 2k] = top 2k minus top k; the cond skips the work when not asked.
    selected = lax.cond(skip, lambda: _top(keys, kq_skip, per_row) & ~selected, lambda: selected)
    if retain is not None:
        selected = selected & ~_top(_sort_keys(_as_2d(retain), False), kp, per_row)
    return selected.reshape(shape)


@functools.lru_cache(maxsize=None)
def _leaf_selector(sharding, per_row: bool):
    # One jitted function per (output sharding, granularity); jax caches its compilations
    # per leaf shape, so a model's projection shapes compile once each.
    return _jit(functools.partial(_select_leaf, per_row=per_row), sharding)


def _jit(fn, out_sharding):
    # Outputs take the score's own sharding; host (NumPy) inputs leave placement to jax.
    return jax.jit(fn) if out_sharding is None else jax.jit(fn, out_shardings=out_sharding)


def _colocate(x: Any, sharding: Any) -> Any:
    # Retain scores on other devices than the harm scores are moved to the harm sharding;
    # jit rejects arguments committed to different device sets.
    if sharding is not None and isinstance(x, jax.Array) and x.sharding.device_set != sharding.device_set:
        return jax.device_put(x, sharding)
    return x


def _sharding_of(x: Any):
    return x.sharding if isinstance(x, jax.Array) else None


def _k(fraction: float, n: int) -> int:
    # floor(fraction * n) in float64, as the reference computes int(numel * q).
    return int(math.floor(fraction * n))


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value}.")
    return value


def _check_leaf(name: str, leaf: Any, what: str) -> None:
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise MaskMismatchError(f"{what} score {name!r} has dtype {leaf.dtype}; scores must be floating point.")
    if leaf.size > _INT32_MAX:
        raise ValueError(
            f"{what} score {name!r} has {leaf.size} entries; selection counts in int32 per "
            "leaf and supports leaves of fewer than 2**31 entries."
        )


def select(
    harm: Mapping[str, Any],
    retain: Mapping[str, Any] | None = None,
    *,
    q: float,
    p: float = 0.0,
    granularity: str = "matrix",
    sign_flip: bool = False,
    skip_first: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The mask T_q(harm) \\ T_p(retain): weights to prune, as a bool tree like `harm`.

    Args:
      harm: score tree (float leaves, the params' structure restricted to scored weights);
        jax.Arrays (sharded or not) or NumPy arrays.
      retain: score tree of the same structure and shapes, or None for no T_p subtraction.
      q: fraction of each matrix (row, or of all scored weights for "global") taken by harm.
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
    q = _check_fraction("q", q)
    p = _check_fraction("p", p)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    if retain is not None:
        check_same_structure(harm, retain, what="harm and retain score trees")
    harm_items = hf_sorted_leaves(harm)
    retain_flat = dict(hf_sorted_leaves(retain)) if retain is not None else {}
    for name, leaf in harm_items:
        _check_leaf(name, leaf, "Harm")
        if retain is not None:
            _check_leaf(name, retain_flat[name], "Retain")
            retain_flat[name] = _colocate(retain_flat[name], _sharding_of(leaf))
    if not harm_items:
        return {}
    if granularity == "global":
        return _select_global(harm_items, retain_flat or None, q, p, sign_flip, skip_first, progress)

    per_row = granularity == "row"
    out = {}
    for name, h in tqdm(harm_items, desc="select", unit="matrix", disable=not progress, leave=False):
        n = _as_2d_shape(h.shape)[1] if per_row else int(h.size)
        kq = _k(q, n)
        r = retain_flat.get(name)
        if not per_row and _on_host(h) and (r is None or _on_host(r)):
            out[name] = _select_leaf_host(h, r, kq, min(2 * kq, n), _k(p, n), sign_flip, skip_first)
            continue
        out[name] = _wait_if_collective(_leaf_selector(_sharding_of(h), per_row)(
            h, retain_flat.get(name), np.int32(kq), np.int32(min(2 * kq, n)), np.int32(_k(p, n)),
            np.bool_(sign_flip), np.bool_(skip_first),
        ))
    return unflatten(out)


def _on_host(x: Any) -> bool:
    """A NumPy array, or a jax.Array on one CPU device: selection can run in NumPy."""
    if isinstance(x, np.ndarray):
        return True
    return isinstance(x, jax.Array) and len(x.sharding.device_set) == 1 and \
        next(iter(x.sharding.device_set)).platform == "cpu"


_host_sort_keys = jax.jit(_sort_keys, static_argnums=1)


def _host_top(keys: np.ndarray, k: int) -> np.ndarray:
    """The k largest keys of a flat array, ties by lowest index: `_top`'s result, in O(n) with
    one partition instead of ~50 counting passes (the CPU path; accelerators use `_top`)."""
    out = np.zeros(keys.shape, bool)
    if k <= 0:
        return out
    if k >= keys.size:
        out[:] = True
        return out
    t = np.partition(keys, keys.size - k)[keys.size - k]  # the k-th largest key
    out |= keys > t
    rest = k - int(out.sum())
    if rest > 0:
        out[np.flatnonzero(keys == t)[:rest]] = True
    return out


def _select_leaf_host(harm, retain, kq: int, kq_skip: int, kp: int, flip: bool, skip: bool):
    """`_select_leaf` for one matrix held on the host (same keys, same tie rule)."""
    keys = np.asarray(_host_sort_keys(jnp.asarray(harm), bool(flip))).ravel()
    selected = _host_top(keys, kq)
    if skip:
        selected = _host_top(keys, kq_skip) & ~selected
    if retain is not None:
        selected &= ~_host_top(np.asarray(_host_sort_keys(jnp.asarray(retain), False)).ravel(), kp)
    selected = selected.reshape(harm.shape)
    sharding = _sharding_of(harm)
    return jax.device_put(selected, sharding) if sharding is not None else jnp.asarray(selected)


def _wait_if_collective(x: jax.Array) -> jax.Array:
    """Waits for a leaf's mask when it spans several devices.

    Each leaf's program all-reduces inside its bisection loops; XLA:CPU runs the devices of
    every in-flight program on one small thread pool and deadlocks (a rendezvous timeout)
    when many such programs are queued at once. On accelerators the wait costs microseconds
    against a leaf's dozens of passes over its scores.
    """
    if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
        x.block_until_ready()
    return x


def _as_2d_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 2:
        return shape
    if len(shape) <= 1:
        return 1, int(np.prod(shape, dtype=np.int64))
    return int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]


# ---- global selection --------------------------------------------------------------------


def _replicated_like(x: Any):
    s = _sharding_of(x)
    return NamedSharding(s.mesh, P()) if isinstance(s, NamedSharding) else None


def _radix_bits(leaf: Any) -> int:
    """Bits of the global threshold found per pass: 4 on accelerators (see `_global_plan`),
    1 on CPUs, which run one program over every leaf instead (`_global_plan_one_program`):
    XLA:CPU must finish each multi-device program before the next, so 2 x 33 x (leaves)
    small programs cost more there than one big compilation (26 s against 14 s on 112
    leaves, measured on 2 CPU cores)."""
    return 1 if _on_cpu(leaf) else 4


def _on_cpu(x: Any) -> bool:
    return not isinstance(x, jax.Array) or next(iter(x.sharding.device_set)).platform == "cpu"


@functools.lru_cache(maxsize=None)
def _leaf_counter(out_sharding):
    """counts[j] = #(keys >= cands[j]) of one leaf (0 where not valid[j]): one small program
    per leaf shape, so a 64-layer model compiles a handful of them, not one over every leaf."""

    def counts(x, cands, valid, flip):
        keys = _sort_keys(x, flip).reshape(-1)
        got = jnp.stack([_count(keys >= cands[j], None) for j in range(cands.shape[0])])
        return jnp.where(valid, got, 0)

    return _jit(counts, out_sharding)


def _counts_per_leaf(leaves: list[Any], cands: list[int], flip: bool, width: int) -> np.ndarray:
    """(leaves, len(cands)) int64 counts of keys >= each candidate (a candidate >= 2**32
    counts nothing; at most `width` candidates, one compiled width per run). Every leaf's
    program is dispatched before one transfer to the host."""
    valid = np.array([c < 2**32 for c in cands] + [False] * (width - len(cands)))
    padded = np.array([c if c < 2**32 else 0 for c in cands] + [0] * (width - len(cands)), np.uint32)
    out = _replicated_like(leaves[0])
    counter = _leaf_counter(out)
    # Accelerators run every leaf's program back to back before the one transfer; XLA:CPU
    # must finish each multi-device program before the next (see `_wait_if_collective`).
    cpu = _on_cpu(leaves[0])
    parts = []
    for x in leaves:
        parts.append(counter(x, padded, valid, np.bool_(flip)))
        if cpu:
            _wait_if_collective(parts[-1])
    # One transfer per pass: fetching each leaf's counts apart cost ~1 ms of synchronisation
    # each, 5 s of a 7.4 s warm global selection at 14B (measured on 2 x H200).
    return to_host(jnp.stack(parts)).astype(np.int64)[:, : len(cands)]


def _global_plan(leaves: list[Any], k: int, flip: bool) -> tuple[np.uint32, list[int]]:
    """The global k-th largest key t and, per leaf (in the given order), how many entries
    equal to t it contributes: all of them in leaves before the one where the k-th entry
    falls, the remainder there, none after. Counts are summed as exact Python ints.

    t is found a digit of `_radix_bits` bits at a time from the most significant: the largest
    digit d with count(keys >= t + d << shift) >= k (true for d = 0), every candidate digit
    counted in one pass per leaf. Each pass runs one small program per leaf, compiled once
    per leaf shape: a program over all leaves at once took 22 s to compile and run at 14B
    on 2 x H200, nearly all of it compilation."""
    bits = _radix_bits(leaves[0])
    if bits == 1:
        return _global_plan_one_program(leaves, k, flip)
    width = max(2, (1 << bits) - 1)
    if k <= 0:
        t = 0xFFFFFFFF  # no key equals it: nothing selected
    else:
        t = 0
        for shift in range(32 - bits, -1, -bits):
            digits = range(1, 1 << bits)
            totals = _counts_per_leaf(leaves, [t + (d << shift) for d in digits], flip, width).sum(0)
            t += max([d for d, total in zip(digits, totals) if total >= k], default=0) << shift
    ge_t, ge_next = _counts_per_leaf(leaves, [t, t + 1], flip, width).T
    return np.uint32(t), _ties_to_take(k, [int(n) for n in ge_next], [int(n) for n in ge_t - ge_next])


def _ties_to_take(k: int, gt: list[int], eq: list[int]) -> list[int]:
    """Per leaf, how many entries equal to the threshold join the k selected: the k - sum(gt)
    still missing, taken from the leaves in order (the lowest flat index wins ties)."""
    remaining = k - sum(gt)
    take = []
    for n_eq in eq:
        take.append(min(max(remaining, 0), n_eq))
        remaining -= take[-1]
    return take


@functools.lru_cache(maxsize=None)
def _global_counter(out_sharding, strict: bool):
    """Per-leaf counts of keys >= t (or > t and == t when strict) for a list of leaves."""

    def counts(leaves, t, flip):
        keys = [_sort_keys(x, flip) for x in leaves]
        if strict:
            return (jnp.stack([_count(k > t, None) for k in keys]),
                    jnp.stack([_count(k == t, None) for k in keys]))
        return jnp.stack([_count(k >= t, None) for k in keys])

    return _jit(counts, out_sharding)


def _host_ints(x) -> list[int]:
    return [int(v) for v in to_host(x).astype(np.int64)]


def _global_plan_one_program(leaves: list[Any], k: int, flip: bool) -> tuple[np.uint32, list[int]]:
    """`_global_plan` with one bit per pass and one program over every leaf (the CPU path)."""
    out = _replicated_like(leaves[0])
    ge = _global_counter(out, False)
    t = 0
    if k > 0:
        for bit in range(31, -1, -1):
            cand = t | (1 << bit)
            if sum(_host_ints(ge(leaves, np.uint32(cand), np.bool_(flip)))) >= k:
                t = cand
    else:
        t = 0xFFFFFFFF  # no key equals it: nothing selected
    gt, eq = _global_counter(out, True)(leaves, np.uint32(t), np.bool_(flip))
    return np.uint32(t), _ties_to_take(k, _host_ints(gt), _host_ints(eq))


def _global_leaf(harm, retain, plans, flip):
    """A leaf's part of the global mask from precomputed (threshold, ties to take) plans."""
    shape = harm.shape

    def part(x, plan, leaf_flip):
        t, r = plan
        keys = _sort_keys(_as_2d(x), leaf_flip)
        return (keys > t) | _first_equal_matrix(keys == t, r)

    selected = part(harm, plans["q"], flip)
    if "q_skip" in plans:
        selected = part(harm, plans["q_skip"], flip) & ~selected
    if retain is not None:
        selected = selected & ~part(retain, plans["p"], False)
    return selected.reshape(shape)


@functools.lru_cache(maxsize=None)
def _global_leaf_selector(sharding):
    return _jit(_global_leaf, sharding)


def _select_global(harm_items, retain_flat, q, p, flip, skip, progress):
    names = [n for n, _ in harm_items]
    harm_leaves = [leaf for _, leaf in harm_items]
    total = sum(int(leaf.size) for leaf in harm_leaves)
    kq = _k(q, total)
    plans = {"q": _global_plan(harm_leaves, kq, flip)}
    if skip:
        plans["q_skip"] = _global_plan(harm_leaves, min(2 * kq, total), flip)
    if retain_flat is not None:
        plans["p"] = _global_plan([retain_flat[n] for n in names], _k(p, total), False)
    out = {}
    for i, (name, h) in enumerate(
        tqdm(harm_items, desc="select (global)", unit="matrix", disable=not progress, leave=False)
    ):
        leaf_plans = {key: (t, np.int32(take[i])) for key, (t, take) in plans.items()}
        fn = _global_leaf_selector(_sharding_of(h))
        out[name] = _wait_if_collective(
            fn(h, retain_flat[name] if retain_flat is not None else None, leaf_plans, np.bool_(flip))
        )
    return unflatten(out)
