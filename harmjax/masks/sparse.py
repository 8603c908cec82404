"""Sparse forms of masks and scores: per matrix, sorted flat indices (row-major over the HF
(out, in) shape).

A mask at q = 1e-5 prunes about 1 weight in 100,000, so its indices are ~10^5 times smaller
than a dense bool tree (31 GB at 32B). Selection per matrix needs only the top entries of a
score, so the experiment keeps, per matrix, the top floor(f * |M|) entries of each score
tree ("candidates": flat indices and values, ordered as `select` ranks them) instead of the
dense float32 tree (124 GB at 32B). Masks built from candidates are bit-identical to
`select` on the dense scores (granularity "matrix"), because:
  - `select` takes the first floor(q * |M|) entries of the order (descending sort key,
    ascending flat index), the same order candidates are stored in;
  - floor(q * |M|) <= floor(f * |M|) for q <= f, so those entries are a prefix of the
    candidates.
For a MoE layer's per-expert leaves, M is their group (`harmjax.masks.groups`): each leaf's
candidates are its entries among the group's top floor(f * |group|), which may be none or
all of one expert; `select_indices` merges a group's candidates by (key, expert, index).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harmjax.distributed import to_host as _to_host
from harmjax.masks.algebra import hf_sorted_leaves
from harmjax.masks.groups import expert_groups, selection_units
from harmjax.masks.select import check_arguments, iter_checked
from harmjax.masks.select_compile import replicated_like, signature
from harmjax.masks.select_keys import INT32_MAX, host_sort_keys, numpy_sort_keys, sort_keys, top_count
from harmjax.tree import iter_leaves, unflatten

INDEX_DTYPE = np.int64  # torch indexes with int64; a matrix may exceed 2**31 entries in future models


def mask_indices(mask: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{HF name: sorted int64 flat indices of the True entries} of a bool mask tree. Device
    leaves travel bit-packed (`device_indices`): a 32B model's dense mask is 31 GB."""
    return {name: device_indices(leaf) if isinstance(leaf, jax.Array) and leaf.size
            else np.flatnonzero(_to_host(leaf)).astype(INDEX_DTYPE) for name, leaf in hf_sorted_leaves(mask)}


def _bucket(n: int) -> int:
    # Index arrays are padded to a power of two, so masks of similar size share a compilation.
    return max(256, 1 << (max(int(n), 1) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _pack_fn(out_sharding):
    # 8 entries per byte along the last axis: the dense bool leaf never crosses to the host,
    # only an eighth of it does. (`jnp.nonzero` at a static size would send k indices, but its
    # bincount is a scatter-add of every entry into k bins, which serialises on GPU atomics;
    # docs/measurements.md "Selection".)
    def pack(m):
        return jnp.packbits(_as_matrix(m), axis=-1)

    return jax.jit(pack) if out_sharding is None else jax.jit(pack, out_shardings=out_sharding)


def _as_matrix(m):
    return m.reshape(1, -1) if m.ndim < 2 else m.reshape(-1, m.shape[-1])


def device_indices(leaf: jax.Array) -> np.ndarray:
    """Sorted int64 flat indices of the True entries of one bool device leaf. The leaf is
    bit-packed on the devices (1/8 of its bytes reach the host) and only its nonzero bytes are
    unpacked; every process gets them all."""
    cols = int(leaf.shape[-1]) if leaf.ndim >= 2 else int(leaf.size)
    packed = _to_host(_pack_fn(replicated_like(leaf))(leaf))
    row_bytes = packed.shape[-1]
    byte_at = _nonzero_bytes(packed.reshape(-1))
    rows, byte = byte_at // row_bytes, byte_at % row_bytes
    bits = np.unpackbits(packed.reshape(-1)[byte_at][:, None], axis=1).astype(bool)  # big-endian, as packbits
    r, b = np.nonzero(bits)
    cols_hit = byte[r].astype(np.int64) * 8 + b
    keep = cols_hit < cols  # packbits pads the last byte of a row with zeros; kept for safety
    return (rows[r].astype(np.int64) * cols + cols_hit)[keep].astype(INDEX_DTYPE)


def _nonzero_bytes(flat: np.ndarray) -> np.ndarray:
    """Ascending positions of the nonzero bytes of a flat uint8 array. A mask is nearly all
    zero bytes, so the scan reads 8 bytes at a time and looks inside the nonzero words only
    (`np.nonzero` byte by byte was most of a score unit's candidate writing)."""
    head = flat.size - flat.size % 8
    words = np.flatnonzero(flat[:head].view(np.uint64))
    at = (words[:, None] * 8 + np.arange(8)).reshape(-1)
    at = at[flat[at] != 0]
    tail = head + np.flatnonzero(flat[head:])
    return np.concatenate([at, tail]).astype(np.int64)


@functools.lru_cache(maxsize=None)
def _scatter_fn(shape: tuple[int, int], sharding):
    def build(idx):
        # Padding entries hold the leaf's size: their row is out of bounds and is dropped.
        return jnp.zeros(shape, bool).at[idx // shape[1], idx % shape[1]].set(True, mode="drop")

    return jax.jit(build, out_shardings=sharding)


def _device_mask(idx: np.ndarray, shape: tuple[int, int], sharding) -> jax.Array:
    """The bool matrix of flat `idx`, built by a scatter on the devices straight into
    `sharding` (only the indices are sent, not a dense block per device)."""
    padded = np.full(_bucket(idx.size), int(np.prod(shape, dtype=np.int64)), np.int32)
    padded[: idx.size] = idx
    return _scatter_fn(shape, sharding)(padded)


def mask_from_indices(indices: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]],
                      shardings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The dense bool mask tree of flat `indices` per HF name (`shapes` gives each matrix's
    shape). With `shardings` ({name: sharding}, flat or nested), each leaf is built straight
    into its sharding (matrices by a scatter on the devices); otherwise NumPy leaves."""
    flat_sh = dict(iter_leaves(shardings)) if shardings is not None else {}
    out = {}
    for name, shape in shapes.items():
        idx = np.asarray(indices.get(name, np.zeros(0, INDEX_DTYPE)), INDEX_DTYPE)
        shape = tuple(int(s) for s in shape)
        size = int(np.prod(shape, dtype=np.int64))
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            raise ValueError(f"Mask indices of {name!r} fall outside its {size} entries (shape {shape}).")
        sharding = flat_sh.get(name)
        if sharding is None:
            dense = np.zeros(size, bool)
            dense[idx] = True
            out[name] = dense.reshape(shape)
        elif len(shape) == 2 and 0 < size <= INT32_MAX:
            out[name] = _device_mask(idx, shape, sharding)
        else:
            def part(index, idx=idx, shape=shape):
                # This device's slice of the dense leaf (vectors and very large leaves).
                full = np.zeros(int(np.prod(shape, dtype=np.int64)), bool)
                full[idx] = True
                return full.reshape(shape)[index]

            out[name] = jax.make_array_from_callback(shape, sharding, part)
    return unflatten(out)


@functools.lru_cache(maxsize=None)
def _gather_fn(out_sharding):
    # Replicated output: the K gathered values and their sort keys are small; every process
    # gets them all. The keys come from `select`'s own function on the scores' own backend.
    def gather(x, idx):
        values = x.reshape(-1)[idx]
        return values.astype(jnp.float32), sort_keys(values, False)

    return jax.jit(gather) if out_sharding is None else jax.jit(gather, out_shardings=out_sharding)


def _gather_flat(leaf: Any, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(leaf.ravel()[idx] as float32, their `select` sort keys) in NumPy, without bringing
    the whole leaf to the host."""
    if isinstance(leaf, np.ndarray):
        values = np.asarray(leaf, np.float32).reshape(-1)[idx]
        return values, np.asarray(host_sort_keys(jnp.asarray(values), False))
    if not idx.size:
        return np.zeros(0, np.float32), np.zeros(0, np.uint32)
    # Padded to a power of two: an expert's candidate count varies, and each length would compile.
    padded = np.zeros(_bucket(idx.size), np.int32)
    padded[: idx.size] = idx
    values, keys = _gather_fn(replicated_like(leaf))(leaf, padded)
    return (np.asarray(_to_host(values), np.float32)[: idx.size],
            np.asarray(_to_host(keys), np.uint32)[: idx.size])


Candidates = dict[str, tuple[np.ndarray, np.ndarray]]  # {HF name: (int64 flat indices, float32 scores)}


def top_candidates(scores: Mapping[str, Any], fraction: float) -> Candidates:
    """Per matrix, the top floor(fraction * |M|) entries of a score tree in `select`'s ranking
    order: {HF name: (int64 flat indices, float32 values)}, ordered by descending score
    (select's sort keys: -0.0 ties +0.0, NaN last) and, among equal keys, ascending index.
    An expert group's leaves hold their part of the group's top floor(fraction * |group|).

    The sets are found by `select` itself (exact and sharding-preserving), one matrix at a
    time (`iter_select`), so only one matrix's bool mask is alive at once; each reaches
    the host bit-packed, and of the scores only the chosen values do. The few distinct
    programs (per leaf shape: selection, packing, gathering) are compiled side by side first.
    """
    _, _, items, _ = check_arguments(scores, None, fraction, 0.0, "matrix")
    grouped = expert_groups(name for name, _ in items)
    jobs = {}  # compiled together with the selection programs
    for name, leaf in items:
        if isinstance(leaf, jax.Array) and leaf.size:
            mask = jax.ShapeDtypeStruct(leaf.shape, jnp.bool_, sharding=leaf.sharding)
            jobs.setdefault(("pack",) + signature(leaf), (_pack_fn(replicated_like(leaf)), (mask,)))
            k = top_count(fraction, int(leaf.size))  # exactly the selected count (a group's leaf: unknown)
            if k and name not in grouped:
                jobs.setdefault(("gather", _bucket(k)) + signature(leaf),
                                (_gather_fn(replicated_like(leaf)), (leaf, jnp.zeros(_bucket(k), jnp.int32))))
    flat = dict(items)
    out = {}
    for name, top in iter_checked(items, None, fraction, 0.0, "matrix", False, False, False, extra_jobs=jobs):
        idx = (device_indices(top) if isinstance(top, jax.Array) and top.size
               else np.flatnonzero(_to_host(top)).astype(INDEX_DTYPE))
        del top
        values, keys = _gather_flat(flat[name], idx)
        order = np.lexsort((idx, ~keys))  # primary: key descending (~ reverses uint32), then index
        out[name] = (idx[order], values[order])
    return out


def select_indices(harm: Candidates, retain: Candidates | None,
                   shapes: Mapping[str, tuple[int, ...]], q: float, p: float = 0.0) -> dict[str, np.ndarray]:
    """T_q(harm) \\ T_p(retain) per matrix from candidates (`top_candidates`): sorted flat
    indices per HF name, equal to `select(harm, retain, q=q, p=p)` on the dense scores (an
    expert group ranked as one matrix, as there).

    Raises ValueError when a fraction needs more entries than the candidates hold."""
    out = {}
    for unit in selection_units(shapes):
        n = sum(int(np.prod(shapes[m], dtype=np.int64)) for m in unit)
        chosen = _unit_top(harm, unit, top_count(q, n), f"q={q} needs the top {{k}} entries of {{what}}",
                           "rescore with a larger candidate fraction (the scores stage keeps the largest q, "
                           "category_q and p of the masks settings).")
        if retain is not None:
            spared = _unit_top(retain, unit, top_count(p, n), f"p={p} needs the top {{k}} retain entries of {{what}}",
                               "")
            chosen = {m: np.setdiff1d(chosen[m], spared[m], assume_unique=True) for m in unit}
        out.update({m: chosen[m].astype(INDEX_DTYPE) for m in unit})
    return {name: out[name] for name in shapes}


def _unit_top(cands: Candidates, unit: tuple[str, ...], k: int, need: str, fix: str) -> dict[str, np.ndarray]:
    """{name: sorted flat indices} of the top k entries of a selection unit from its members'
    candidates: a matrix's first k, or a group's k best by (key, expert, index)."""
    held = sum(len(cands[m][0]) for m in unit)
    if k > held:
        what = repr(unit[0]) if len(unit) == 1 else f"the {len(unit)}-expert group of {unit[0]!r}"
        raise ValueError(f"{need.format(k=k, what=what)}, but the stored candidates hold {held}" + (f"; {fix}" if fix
                                                                                                 else "."))
    if len(unit) == 1:
        return {unit[0]: np.sort(cands[unit[0]][0][:k])}
    idx = np.concatenate([cands[m][0] for m in unit]).astype(np.int64)
    member = np.repeat(np.arange(len(unit)), [len(cands[m][0]) for m in unit])
    keys = numpy_sort_keys(np.concatenate([cands[m][1] for m in unit]))
    top = np.lexsort((idx, member, ~keys))[:k]  # key descending, then expert, then flat index
    return {m: np.sort(idx[top][member[top] == j]) for j, m in enumerate(unit)}


def jaccard_indices(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """|a ∩ b| / |a ∪ b| of two sparse masks over the same matrices (1.0 when both are
    empty), equal to `harmjax.masks.jaccard` on the dense masks."""
    if set(a) != set(b):
        raise ValueError(f"Sparse masks cover different matrices: {sorted(set(a) ^ set(b))[:3]}.")
    both = sum(len(np.intersect1d(a[n], b[n], assume_unique=True)) for n in a)
    either = sum(len(a[n]) + len(b[n]) for n in a) - both
    return 1.0 if either == 0 else both / either
