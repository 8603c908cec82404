"""Selection's NumPy engine: one matrix whose scores are on the host (a NumPy array or a
jax.Array on one CPU device) is selected with NumPy's partition, in O(n), instead of the
device engine's counting passes. Same keys (`sort_keys`) and the same tie rule (lowest flat
index first), so the masks are identical."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harmjax.masks.select_compile import on_host, sharding_of
from harmjax.masks.select_keys import host_sort_keys


def in_numpy(harm: Any, retain: Any, per_row: bool) -> bool:
    """Whether this engine selects the leaf: a matrix (not per row) whose harm and retain
    scores are both on the host."""
    return not per_row and on_host(harm) and (retain is None or on_host(retain))


def host_top(keys: np.ndarray, k: int) -> np.ndarray:
    """The k largest keys of a flat array, ties by lowest index: `select_keys.top`'s result,
    in O(n) with one partition instead of ~50 counting passes."""
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


def select_leaf_host(harm, retain, kq: int, kq_skip: int, kp: int, flip: bool, skip: bool):
    """T_q \\ T_p of one matrix held on the host (the device engine's `select_leaf`, same
    keys, same tie rule), returned with the harm scores' sharding (or as a jax.Array)."""
    return select_group_host([harm], None if retain is None else [retain], kq, kq_skip, kp, flip, skip)[0]


def _flat_keys(leaves, flip: bool) -> np.ndarray:
    # The leaves' sort keys end to end: leaf order first, then row-major (the tie order).
    return np.concatenate([np.asarray(host_sort_keys(jnp.asarray(x), bool(flip))).ravel() for x in leaves])


def select_group_host(harms, retains, kq: int, kq_skip: int, kp: int, flip: bool, skip: bool) -> list:
    """T_q \\ T_p of several host matrices ranked as one (an expert group,
    `harmjax.masks.groups`): their entries concatenated in the given order, so ties go to the
    earlier leaf, then the lower flat index. Returns one mask per leaf, each with its harm
    scores' sharding (or as a jax.Array); one leaf is `select_leaf_host`."""
    keys = _flat_keys(harms, flip)
    selected = host_top(keys, kq)
    if skip:
        selected = host_top(keys, kq_skip) & ~selected
    if retains is not None:
        selected &= ~host_top(_flat_keys(retains, False), kp)
    out, start = [], 0
    for harm in harms:
        part = selected[start: start + int(harm.size)].reshape(harm.shape)
        start += int(harm.size)
        sharding = sharding_of(harm)
        out.append(jax.device_put(part, sharding) if sharding is not None else jnp.asarray(part))
    return out
