"""Selection's device engine (granularities "matrix" and "row"): one jitted loop program per
leaf finds T_q \\ T_p with the counting top-k of `harmjax.masks.select_keys`, 2 threshold bits
per pass for matrices (`_DEVICE_LOOP_BITS`) and 1 per row, with no host round trip. The
program's output keeps the scores' sharding."""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax import lax

from harmjax.masks.select_compile import jit_to, sharding_of, signature
from harmjax.masks.select_host import in_numpy
from harmjax.masks.select_keys import as_2d, sort_keys, top

# Threshold bits found per pass of a matrix's loop (rows take 1); 2 measured best on
# accelerators against 1 and 4 (docs/measurements.md "Selection").
_DEVICE_LOOP_BITS = 2


def _select_leaf(harm, retain, kq, kq_skip, kp, flip, skip, *, per_row, bits):
    """T_q \\ T_p of one leaf, all in one program (no host round trip). `flip` and `skip` are
    traced booleans, so the controls reuse the same compilation."""
    shape = harm.shape
    keys = sort_keys(as_2d(harm), flip)
    selected = top(keys, kq, per_row, bits)
    # skip: ranks (k, 2k] = top 2k minus top k; the cond skips the work when not asked.
    selected = lax.cond(skip, lambda: top(keys, kq_skip, per_row, bits) & ~selected, lambda: selected)
    if retain is not None:
        selected = selected & ~top(sort_keys(as_2d(retain), False), kp, per_row, bits)
    return selected.reshape(shape)


def leaf_selector(sharding, per_row: bool):
    """The jitted loop program of one leaf, called as (harm, retain or None, int32 kq,
    int32 kq_skip, int32 kp, bool flip, bool skip) and returning its bool mask in
    `sharding`. Rows search 1 bit per pass, matrices `_DEVICE_LOOP_BITS`."""
    return _leaf_selector_for(sharding, per_row, 1 if per_row else _DEVICE_LOOP_BITS)


@functools.lru_cache(maxsize=None)
def _leaf_selector_for(sharding, per_row: bool, bits: int):
    # One jitted function per (output sharding, granularity, digit width); jax caches its
    # compilations per leaf shape, so a model's projection shapes compile once each.
    return jit_to(functools.partial(_select_leaf, per_row=per_row, bits=bits), sharding)


def loop_jobs(harm_items, retain_flat, per_row: bool) -> dict:
    """`precompile` jobs of the per-leaf loop programs: one per distinct leaf signature
    (leaves the NumPy engine selects need none)."""
    jobs = {}
    for name, h in harm_items:
        r = retain_flat.get(name) if retain_flat is not None else None
        if in_numpy(h, r, per_row) or not isinstance(h, jax.Array):
            continue
        scalars = (np.int32(0),) * 3 + (np.bool_(False),) * 2
        jobs.setdefault(("loop", per_row) + signature(h, r),
                        (leaf_selector(sharding_of(h), per_row), (h, r) + scalars))
    return jobs
