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
(`_sort_keys`). The k-th largest key t is found a digit at a time, most significant first:
every candidate digit is counted in one compare-and-sum pass (XLA fuses it; for a sharded
array it reduces locally and all-reduces the counts), and the largest digit whose count
still reaches k is kept. Entries above t are selected; the entries equal to t are all taken,
none, or (rarely, with tied scores) cut at the right flat position by two bisections (over
rows, then columns) made of the same count reductions. Nothing is gathered or sorted, so a
58M-entry matrix sharded over devices stays sharded, and memory is a few temporaries of one
leaf.

Two ways to run it:
  - one loop program per leaf (matrix and row selection): the search inside
    `lax.fori_loop`, 2 bits per pass for matrices (`_DEVICE_LOOP_BITS`), 1 per row. Host
    (NumPy) matrices use NumPy's partition instead.
  - planned (global selection): the digits are chosen on the host, 4 bits per pass on
    accelerators, with one program per decoder layer counting every matrix's candidates,
    so the search compiles two small programs per model. Counts are summed on the host as
    exact integers (the total may exceed 2**31). On CPU it plans one bit per pass with one
    program over every leaf (`_global_plan_one_program`).
The few distinct programs a model needs (one per leaf shape) are compiled side by side on
threads before the first leaf runs (`_precompile`). See BUILD_NOTES, "Selection's first call".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from harmjax.distributed import to_host
from harmjax.masks.algebra import MaskMismatchError, check_same_structure, hf_order_key, hf_sorted_leaves
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


# Threshold bits found per pass of `_leaf_selector`'s loop (matrix granularity; rows take 1).
# 2 measured best at 14B on 2 x H200: 1.55 s warm against 2.09 s (1 bit) and 1.74 s (4 bits).
_DEVICE_LOOP_BITS = 2


def _count_ge(keys: jax.Array, cands: jax.Array, axis: int | None) -> jax.Array:
    """#(keys >= c) for every candidate c on the last axis of `cands`: axis=None counts the
    whole array (`cands` shape (W,), result (W,)), axis=1 each row of a 2-D `keys` (`cands`
    (rows, 1, W), result (rows, 1, W)). One reduction per candidate over the same keys, which
    XLA fuses into one pass; comparing against every candidate in one broadcast was 1.4x
    slower on an H200."""
    return jnp.stack([_count(keys >= cands[..., j], axis) for j in range(cands.shape[-1])], axis=-1)


def _kth_largest_key(keys: jax.Array, k: jax.Array, axis: int | None, bits: int = 1) -> jax.Array:
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
        best = jnp.sum(_count_ge(keys, cands, axis) >= kk, axis=-1, dtype=jnp.uint32)
        return t + (best << shift)

    return lax.fori_loop(0, 32 // bits, step, jnp.zeros(shape, jnp.uint32))


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


def _top(keys: jax.Array, k: jax.Array, per_row: bool, bits: int = 1) -> jax.Array:
    """Bool mask of the k largest keys of a 2-D array (per row when per_row), ties by lowest
    row-major index; the threshold is found `bits` bits per pass."""
    axis = 1 if per_row else None
    t = _kth_largest_key(keys, k, axis, bits)
    above = keys > t
    r = k - _count(above, axis)
    equal = keys == t
    # The entries equal to t are cut by bisection only when some but not all of them are
    # taken; with continuous scores that is rare, and the cut costs ~30 more passes.
    n_equal = _count(equal, axis)
    first = _first_equal_rows if per_row else _first_equal_matrix
    cut = jnp.any((r > 0) & (r < n_equal))
    return above | lax.cond(cut, lambda: first(equal, r), lambda: equal & (r > 0))


def _as_2d(x: jax.Array) -> jax.Array:
    if x.ndim == 2:
        return x
    return x.reshape(1, -1) if x.ndim <= 1 else x.reshape(-1, x.shape[-1])


def _select_leaf(harm, retain, kq, kq_skip, kp, flip, skip, *, per_row, bits):
    """T_q \\ T_p of one leaf, all in one program (no host round trip). `flip` and `skip` are
    traced booleans, so the controls reuse the same compilation."""
    shape = harm.shape
    keys = _sort_keys(_as_2d(harm), flip)
    selected = _top(keys, kq, per_row, bits)
    # skip: ranks (k, 2k] = top 2k minus top k; the cond skips the work when not asked.
    selected = lax.cond(skip, lambda: _top(keys, kq_skip, per_row, bits) & ~selected, lambda: selected)
    if retain is not None:
        selected = selected & ~_top(_sort_keys(_as_2d(retain), False), kp, per_row, bits)
    return selected.reshape(shape)


def _leaf_selector(sharding, per_row: bool):
    """The jitted loop program of one leaf (rows search 1 bit per pass, matrices
    `_DEVICE_LOOP_BITS`)."""
    return _leaf_selector_for(sharding, per_row, 1 if per_row else _DEVICE_LOOP_BITS)


@functools.lru_cache(maxsize=None)
def _leaf_selector_for(sharding, per_row: bool, bits: int):
    # One jitted function per (output sharding, granularity, digit width); jax caches its
    # compilations per leaf shape, so a model's projection shapes compile once each.
    return _jit(functools.partial(_select_leaf, per_row=per_row, bits=bits), sharding)


def _jit(fn, out_sharding):
    # Outputs take the score's own sharding; host (NumPy) inputs leave placement to jax.
    return jax.jit(fn) if out_sharding is None else jax.jit(fn, out_shardings=out_sharding)


_COMPILE_THREADS = 8


def _precompile(jobs: Mapping[Any, tuple[Any, tuple]]) -> None:
    """Compiles jitted calls before they run, side by side on threads: {signature: (jitted
    function, example arguments)}. XLA releases the GIL while it compiles, and jit's own call
    path then finds each compilation in its cache. A model's leaves need a few distinct small
    programs (4 leaf shapes at 14B): 2.07 s one after another, 0.70 s on threads (measured on
    2 x H200)."""
    if len(jobs) < 2:
        return
    with ThreadPoolExecutor(min(len(jobs), _COMPILE_THREADS)) as pool:
        list(pool.map(lambda job: job[0].lower(*job[1]).compile(), jobs.values()))


def _signature(*xs: Any) -> tuple:
    """What a jitted call's compilation depends on, per array argument."""
    return tuple(None if x is None else (tuple(x.shape), str(x.dtype), _sharding_of(x)) for x in xs)


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
    return unflatten(dict(iter_select(harm, retain, q=q, p=p, granularity=granularity, sign_flip=sign_flip,
                                      skip_first=skip_first, progress=progress)))


def iter_select(
    harm: Mapping[str, Any],
    retain: Mapping[str, Any] | None = None,
    *,
    q: float,
    p: float = 0.0,
    granularity: str = "matrix",
    sign_flip: bool = False,
    skip_first: bool = False,
    progress: bool = True,
) -> Iterator[tuple[str, Any]]:
    """`select`'s mask one leaf at a time: (dotted HF name, bool leaf) pairs in HF order.

    The arguments are `select`'s and are checked before the first pair. A consumer that
    drops each leaf after use (`harmjax.masks.sparse.top_candidates`) holds at most one
    layer's masks, not the dense tree (31 GB at 32B)."""
    q, p, harm_items, retain_flat = _checked(harm, retain, q, p, granularity)
    return _iter_select(harm_items, retain_flat, q, p, granularity, sign_flip, skip_first, progress)


def _checked(harm, retain, q, p, granularity):
    """`select`'s arguments checked: (q, p, harm's (name, leaf) pairs in HF order, retain's
    {name: leaf} on the harm leaves' devices, or None)."""
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
            retain_flat[name] = _colocate(retain_flat[name], _sharding_of(leaf))
    return q, p, harm_items, retain_flat


def _iter_select(harm_items, retain_flat, q, p, granularity, flip, skip, progress,
                 extra_jobs=None) -> Iterator[tuple[str, Any]]:
    """`iter_select` on checked arguments; `extra_jobs` (matrix and row) are compiled
    together with the loop programs (the candidates' packing and gathering)."""
    if not harm_items:
        return
    if granularity == "global":
        yield from _select_global(harm_items, retain_flat, q, p, flip, skip, progress)
        return
    per_row = granularity == "row"
    _precompile({**_loop_jobs(harm_items, retain_flat, per_row), **(extra_jobs or {})})
    for name, h in tqdm(harm_items, desc="select", unit="matrix", disable=not progress, leave=False):
        n = _as_2d_shape(h.shape)[1] if per_row else int(h.size)
        kq = _k(q, n)
        r = retain_flat.get(name) if retain_flat is not None else None
        if _in_numpy(h, r, per_row):
            yield name, _select_leaf_host(h, r, kq, min(2 * kq, n), _k(p, n), flip, skip)
            continue
        yield name, _wait_if_collective(_leaf_selector(_sharding_of(h), per_row)(
            h, r, np.int32(kq), np.int32(min(2 * kq, n)), np.int32(_k(p, n)), np.bool_(flip), np.bool_(skip),
        ))


def _loop_jobs(harm_items, retain_flat, per_row: bool) -> dict:
    """`_precompile` jobs of the per-leaf loop programs: one per distinct leaf signature."""
    jobs = {}
    for name, h in harm_items:
        r = retain_flat.get(name) if retain_flat is not None else None
        if _in_numpy(h, r, per_row) or not isinstance(h, jax.Array):
            continue
        scalars = (np.int32(0),) * 3 + (np.bool_(False),) * 2
        jobs.setdefault(("loop", per_row) + _signature(h, r),
                        (_leaf_selector(_sharding_of(h), per_row), (h, r) + scalars))
    return jobs


def _in_numpy(harm: Any, retain: Any, per_row: bool) -> bool:
    # A matrix whose scores are on the host is selected by NumPy's partition.
    return not per_row and _on_host(harm) and (retain is None or _on_host(retain))


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


# ---- global selection ----------------------------------------------------------------------


def _replicated_like(x: Any):
    s = _sharding_of(x)
    return NamedSharding(s.mesh, P()) if isinstance(s, NamedSharding) else None


def _radix_bits(leaf: Any) -> int:
    """Bits of the global threshold found per host-driven pass (a divisor of 32): 4 on
    accelerators (`_plan`, one program per layer); 1 on CPUs, which run one program over
    every leaf instead (`_global_plan_one_program`): XLA:CPU must finish each
    multi-device program before the next, so many small programs cost more there than one
    big compilation (26 s against 14 s on 112 leaves, measured on 2 CPU cores)."""
    return 1 if _on_cpu(leaf) else 4


def _on_cpu(x: Any) -> bool:
    return not isinstance(x, jax.Array) or next(iter(x.sharding.device_set)).platform == "cpu"


def _layer_chunks(names: list[str]) -> list[list[int]]:
    """Positions of the leaves of each decoder layer (leaves outside layers alone). Every
    layer's chunk has the same shapes and shardings, so a program over a chunk compiles once
    per model and a pass dispatches one program per layer (per leaf it was 336 dispatches
    per pass at 14B; one program over every leaf took 22 s to compile)."""
    chunks: list[list[int]] = []
    last = None
    for i, name in enumerate(names):
        key = hf_order_key(name)
        layer = key[1] if key[0] == 1 else None
        if layer is not None and layer == last:
            chunks[-1].append(i)
        else:
            chunks.append([i])
        last = layer
    return chunks


@functools.lru_cache(maxsize=None)
def _chunk_counter(out_sharding):
    """counts[i, j] = #(keys of leaf i >= cands[i, j]) over a chunk's leaves (0 where not
    valid[i, j]): one pass over each leaf for all its candidates."""

    def counts(xs, cands, valid, flip):
        got = jnp.stack([_count_ge(_sort_keys(x, flip), cands[i], None) for i, x in enumerate(xs)])
        return jnp.where(valid, got, 0)

    return _jit(counts, out_sharding)


def _count_all(leaves: list[Any], chunks: list[list[int]], cands: np.ndarray, valid: np.ndarray,
               flip: bool) -> np.ndarray:
    """(leaves, W) int64 counts of keys >= cands[i, j], one program per chunk; every chunk's
    program is dispatched before one transfer to the host (fetching each program's counts
    apart cost ~1 ms of synchronisation each, measured on 2 x H200)."""
    counter = _chunk_counter(_replicated_like(leaves[0]))
    # XLA:CPU must finish each multi-device program before the next (see `_wait_if_collective`).
    cpu = _on_cpu(leaves[0])
    parts = []
    for chunk in chunks:
        parts.append(counter(tuple(leaves[i] for i in chunk), cands[chunk].astype(np.uint32), valid[chunk],
                             np.bool_(flip)))
        if cpu:
            _wait_if_collective(parts[-1])
    return to_host(jnp.concatenate(parts)).astype(np.int64)


def _plan(leaves: list[Any], chunks: list[list[int]], k: int, flip: bool,
          bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per leaf: the global threshold key t (the k-th largest key over every leaf), how many
    entries equal to t the leaf contributes, and how many it holds.

    t is found `bits` bits at a time from the most significant: the largest digit d with
    count(keys >= t + d << shift) >= k (true for d = 0), every candidate digit counted in
    one pass, with one program per layer (`_count_all`). Counts are summed as exact int64
    (the total may exceed 2**31). Entries equal to t join in leaf order (the lowest flat
    index wins ties)."""
    if 32 % bits:
        raise ValueError(f"bits per pass must divide 32, got {bits}.")
    n, width = len(leaves), _plan_width(bits)
    digits = np.arange(1, 1 << bits, dtype=np.uint64)
    valid = np.zeros((n, width), bool)
    valid[:, : digits.size] = True
    t = 0
    for shift in range(32 - bits, -1, -bits):
        cands = np.zeros((n, width), np.uint64)
        cands[:, : digits.size] = t + (digits << np.uint64(shift))
        totals = _count_all(leaves, chunks, cands, valid, flip).sum(0)[: digits.size]
        # counts fall as the candidate grows, so the digits that still reach k are a prefix
        t += int((totals >= k).sum()) << shift
    cands = np.zeros((n, width), np.uint64)
    cands[:, 0], cands[:, 1] = t, min(t + 1, 0xFFFFFFFF)
    valid = np.zeros((n, width), bool)
    valid[:, 0], valid[:, 1] = True, t < 0xFFFFFFFF  # t + 1 = 2**32: nothing is above t
    counts = _count_all(leaves, chunks, cands, valid, flip)
    gt, eq = counts[:, 1], counts[:, 0] - counts[:, 1]
    take = np.asarray(_ties_to_take(k, [int(x) for x in gt], [int(x) for x in eq]), np.int64)
    return np.full(n, t, np.uint32), take, eq


def _plan_width(bits: int) -> int:
    # Candidates counted per pass: every nonzero digit, and at least 2 (t and t + 1 at the end).
    return max(2, (1 << bits) - 1)


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


def _global_plan_one_program(leaves: list[Any], k: int, flip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_plan` of one global unit with one bit per pass and one program over every leaf (the
    CPU path)."""
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
    eq = np.asarray(_host_ints(eq), np.int64)
    take = np.asarray(_ties_to_take(k, _host_ints(gt), [int(x) for x in eq]), np.int64)
    return np.full(len(leaves), t, np.uint32), take, eq


def _planned_part(x, t, all_equal, flip):
    # A leaf's part when its ties need no cut: above t, plus every entry equal to t or none.
    keys = _sort_keys(x, flip)
    return (keys > t) | ((keys == t) & all_equal)


@functools.lru_cache(maxsize=None)
def _chunk_masker(out_shardings: tuple):
    """A chunk's masks from its plans ({part: (t, all ties taken) per leaf}): T_q, the skip
    control and T_p combined elementwise, one program per chunk signature."""

    def masks(hs, rs, plans, flip):
        out = []
        for i, h in enumerate(hs):
            selected = _planned_part(h, plans["q"][0][i], plans["q"][1][i], flip)
            if "q_skip" in plans:
                selected = _planned_part(h, plans["q_skip"][0][i], plans["q_skip"][1][i], flip) & ~selected
            if rs is not None:
                selected = selected & ~_planned_part(rs[i], plans["p"][0][i], plans["p"][1][i], False)
            out.append(selected)
        return tuple(out)

    return jax.jit(masks) if None in out_shardings else jax.jit(masks, out_shardings=out_shardings)


def _cut_leaf(harm, retain, plans, flip):
    """A leaf's mask when some part takes only the first few of its entries equal to t: those
    are cut by bisection in row-major order (`_first_equal_matrix`)."""
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
def _cut_leaf_selector(sharding):
    return _jit(_cut_leaf, sharding)


def _global_jobs(leaves, retains, chunks, bits: int, parts: list[str]) -> dict:
    """`_precompile` jobs of global selection: per distinct layer signature, the counter (for
    harm and retain leaves) and the mask program."""
    jobs = {}
    for chunk in chunks:
        hs = tuple(leaves[i] for i in chunk)
        rs = tuple(retains[i] for i in chunk) if retains is not None else None
        if bits > 1:
            width = _plan_width(bits)
            zeros = (np.zeros((len(chunk), width), np.uint32), np.zeros((len(chunk), width), bool), np.bool_(False))
            for xs in [hs] + ([rs] if rs is not None else []):
                counter = _chunk_counter(_replicated_like(leaves[0]))
                jobs.setdefault(("count",) + _signature(*xs), (counter, (xs,) + zeros))
        dummy = {key: (np.zeros(len(chunk), np.uint32), np.zeros(len(chunk), bool)) for key in parts}
        jobs.setdefault(("mask",) + _signature(*hs) + _signature(*(rs or ())),
                        (_chunk_masker(tuple(_sharding_of(h) for h in hs)), (hs, rs, dummy, np.bool_(False))))
    return jobs


def _select_global(harm_items, retain_flat, q, p, flip, skip, progress) -> Iterator[tuple[str, Any]]:
    """Global selection: the thresholds planned on the host (`_plan`, or on CPU
    `_global_plan_one_program`), then every layer's masks in one program."""
    names = [n for n, _ in harm_items]
    leaves = [leaf for _, leaf in harm_items]
    chunks = _layer_chunks(names)
    bits = _radix_bits(leaves[0])
    total = sum(int(x.size) for x in leaves)

    def plan(tree_leaves, fraction, leaf_flip, double=False):
        k = min(2 * _k(fraction, total), total) if double else _k(fraction, total)
        if bits == 1:  # CPU: one program over every leaf
            return _global_plan_one_program(tree_leaves, k, leaf_flip)
        return _plan(tree_leaves, chunks, k, leaf_flip, bits)

    retains = [retain_flat[n] for n in names] if retain_flat is not None else None
    _precompile(_global_jobs(leaves, retains, chunks, bits, ["q"] + ["q_skip"] * skip + ["p"] * (retains is not None)))
    plans = {"q": plan(leaves, q, flip)}
    if skip:
        plans["q_skip"] = plan(leaves, q, flip, double=True)
    if retains is not None:
        plans["p"] = plan(retains, p, False)
    cut = np.zeros(len(leaves), bool)
    for _, take, eq in plans.values():
        cut |= (take > 0) & (take < eq)
    bar = tqdm(total=len(names), desc="select (global)", unit="matrix", disable=not progress, leave=False)
    for chunk in chunks:
        hs = tuple(leaves[i] for i in chunk)
        rs = tuple(retains[i] for i in chunk) if retains is not None else None
        chunk_plans = {key: (t[chunk], take[chunk] == eq[chunk]) for key, (t, take, eq) in plans.items()}
        masks = _chunk_masker(tuple(_sharding_of(h) for h in hs))(hs, rs, chunk_plans, np.bool_(flip))
        for j, i in enumerate(chunk):
            mask = masks[j]
            if cut[i]:
                leaf_plans = {key: (t[i], np.int32(take[i])) for key, (t, take, _) in plans.items()}
                mask = _cut_leaf_selector(_sharding_of(hs[j]))(hs[j], rs[j] if rs is not None else None,
                                                                leaf_plans, np.bool_(flip))
            bar.update()
            yield names[i], _wait_if_collective(mask)
        del masks
    bar.close()
