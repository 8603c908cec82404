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
    keys = np.asarray(host_sort_keys(jnp.asarray(harm), bool(flip))).ravel()
    selected = host_top(keys, kq)
    if skip:
        selected = host_top(keys, kq_skip) & ~selected
    if retain is not None:
        selected &= ~host_top(np.asarray(host_sort_keys(jnp.asarray(retain), False)).ravel(), kp)
    selected = selected.reshape(harm.shape)
    sharding = sharding_of(harm)
    return jax.device_put(selected, sharding) if sharding is not None else jnp.asarray(selected)
