"""Selection's exact top-k without sorting: order-preserving keys and counting passes.

Each float32 score maps to a uint32 key with the same order (`sort_keys`). The k-th largest
key t is found a digit at a time, most significant first (`kth_largest_key`): every candidate
digit is counted in one compare-and-sum pass (XLA fuses it; for a sharded array it reduces
locally and all-reduces the counts), and the largest digit whose count still reaches k is
kept. Entries above t are selected; the entries equal to t are all taken, none, or (rarely,
with tied scores) cut at the right flat position by two bisections (over rows, then columns)
made of the same count reductions (`first_equal_matrix`, `first_equal_rows`). Nothing is
gathered or sorted, so a matrix sharded over devices stays sharded, and memory is a few
temporaries of one leaf.

Every selection engine (`harmjax.masks.select_device`, `select_host`, `select_global`) and the
sparse candidates (`harmjax.masks.sparse`) rank by these keys, so they agree bit for bit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Selection counts in int32 per leaf, so a leaf must hold fewer than 2**31 entries.
INT32_MAX = 2**31 - 1


def sort_keys(x: jax.Array, flip: bool | jax.Array) -> jax.Array:
    """uint32 keys ordered like the float32 scores (descending score = descending key).

    Non-negative floats get the sign bit set, negative ones are bit-inverted: the standard
    radix-sort mapping. -0.0 is folded onto +0.0 (they tie, as in NumPy) and NaN maps to 0,
    below -inf (key 0x007fffff). `flip` ranks -x instead (the sign-flip control).
    """
    x = x.astype(jnp.float32)
    x = jnp.where(flip, -x, x)
    x = jnp.where(x == 0, jnp.float32(0), x)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    keys = jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))
    return jnp.where(jnp.isnan(x), jnp.uint32(0), keys)


# `sort_keys` as one jitted call with a static flip, for scores held on the host (the NumPy
# engine and the candidates' gathered values).
host_sort_keys = jax.jit(sort_keys, static_argnums=1)


def numpy_sort_keys(x: np.ndarray) -> np.ndarray:
    """`sort_keys(x, False)` in NumPy, for small host arrays of varying length (the
    candidates a group merges), where a jitted call would compile once per length."""
    x = np.asarray(x, np.float32).copy()
    x[x == 0] = 0.0  # -0.0 ties +0.0
    bits = x.view(np.uint32)
    keys = np.where((bits >> 31) == 1, ~bits, bits | np.uint32(0x80000000))
    return np.where(np.isnan(x), np.uint32(0), keys).astype(np.uint32)


def count(pred: jax.Array, axis: int | None) -> jax.Array:
    """int32 number of True entries of `pred`: of the whole array (axis=None) or per row
    along `axis`, keeping that axis."""
    return jnp.sum(pred, axis=axis, keepdims=axis is not None, dtype=jnp.int32)


def count_ge(keys: jax.Array, cands: jax.Array, axis: int | None) -> jax.Array:
    """#(keys >= c) for every candidate c on the last axis of `cands`: axis=None counts the
    whole array (`cands` shape (W,), result (W,)), axis=1 each row of a 2-D `keys` (`cands`
    (rows, 1, W), result (rows, 1, W)). One reduction per candidate over the same keys, which
    XLA fuses into one pass (faster than comparing against every candidate in one broadcast;
    see docs/measurements.md "Selection")."""
    return jnp.stack([count(keys >= cands[..., j], axis) for j in range(cands.shape[-1])], axis=-1)


def kth_largest_key(keys: jax.Array, k: jax.Array, axis: int | None, bits: int = 1) -> jax.Array:
    """The k-th largest key (per row when axis=1): the largest t with count(keys >= t) >= k.

    Built a digit of `bits` bits at a time from the most significant (bits divides 32): every
    candidate digit is counted in one pass and the largest whose count still reaches k is
    kept (the count falls as the candidate grows, so those digits are a prefix). For k = 0 it
    returns 0xffffffff, which no key equals.
    """
    digits = jnp.arange(1, 1 << bits, dtype=jnp.uint32)
    shape = () if axis is None else keys.shape[:-1] + (1,)
    kk = k if axis is None else k[..., None]

    def step(i, t):
        shift = (32 - bits - bits * i).astype(jnp.uint32)
        cands = t[..., None] + (digits << shift)  # (W,), or (rows, 1, W) per row
        best = jnp.sum(count_ge(keys, cands, axis) >= kk, axis=-1, dtype=jnp.uint32)
        return t + (best << shift)

    return lax.fori_loop(0, 32 // bits, step, jnp.zeros(shape, jnp.uint32))


def _largest_below(limit: int, predicate, shape: tuple[int, ...]) -> jax.Array:
    """The largest integer x in [0, limit) with predicate(x) true (elementwise over `shape`),
    for a predicate that is true at 0 and monotone (true, then false); built bit by bit
    like `kth_largest_key`."""
    nbits = max(1, (limit - 1).bit_length())

    def step(i, x):
        cand = x | (jnp.int32(1) << (nbits - 1 - i))
        return jnp.where((cand < limit) & predicate(cand), cand, x)

    return lax.fori_loop(0, nbits, step, jnp.zeros(shape, jnp.int32))


def first_equal_matrix(equal: jax.Array, r: jax.Array) -> jax.Array:
    """The first `r` True entries of a 2-D `equal` in row-major order (none when r <= 0).

    Finds the row R holding the r-th True (largest R with fewer than r Trues above it),
    then the column C of the r-th True within R, and keeps Trues at or before (R, C).
    """
    rows_n, cols_n = equal.shape
    rows = lax.broadcasted_iota(jnp.int32, equal.shape, 0)
    cols = lax.broadcasted_iota(jnp.int32, equal.shape, 1)
    row_cut = _largest_below(rows_n, lambda x: count(equal & (rows < x), None) < r, ())
    in_row = equal & (rows == row_cut)
    r_in_row = r - count(equal & (rows < row_cut), None)
    col_cut = _largest_below(cols_n, lambda x: count(in_row & (cols < x), None) < r_in_row, ())
    before = (rows < row_cut) | ((rows == row_cut) & (cols <= col_cut))
    return equal & before & (r > 0)


def first_equal_rows(equal: jax.Array, r: jax.Array) -> jax.Array:
    """Per row, the first r[row] True entries of a 2-D `equal` (r has shape (rows, 1))."""
    cols_n = equal.shape[1]
    cols = lax.broadcasted_iota(jnp.int32, equal.shape, 1)
    col_cut = _largest_below(cols_n, lambda x: count(equal & (cols < x), 1) < r, r.shape)
    return equal & (cols <= col_cut) & (r > 0)


def top(keys: jax.Array, k: jax.Array, per_row: bool, bits: int = 1) -> jax.Array:
    """Bool mask of the k largest keys of a 2-D array (per row when per_row), ties by lowest
    row-major index; the threshold is found `bits` bits per pass."""
    axis = 1 if per_row else None
    t = kth_largest_key(keys, k, axis, bits)
    above = keys > t
    r = k - count(above, axis)
    equal = keys == t
    # The entries equal to t are cut by bisection only when some but not all of them are
    # taken; with continuous scores that is rare, and the cut costs ~30 more passes.
    n_equal = count(equal, axis)
    first = first_equal_rows if per_row else first_equal_matrix
    cut = jnp.any((r > 0) & (r < n_equal))
    return above | lax.cond(cut, lambda: first(equal, r), lambda: equal & (r > 0))


def as_2d(x: jax.Array) -> jax.Array:
    """A leaf as the 2-D array selection works on: matrices as they are, vectors and scalars
    as one row, higher ranks with every axis but the last folded into rows."""
    if x.ndim == 2:
        return x
    return x.reshape(1, -1) if x.ndim <= 1 else x.reshape(-1, x.shape[-1])


def as_2d_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The (rows, columns) shape `as_2d` gives a leaf of `shape`."""
    if len(shape) == 2:
        return shape
    if len(shape) <= 1:
        return 1, int(np.prod(shape, dtype=np.int64))
    return int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]


def top_count(fraction: float, n: int) -> int:
    """How many of n entries a fraction selects: floor(fraction * n) in float64, as the
    reference computes int(numel * q)."""
    return int(math.floor(fraction * n))
