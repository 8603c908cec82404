"""Random control masks: the same number of pruned weights in every matrix, at uniformly random
positions. Pruning that many random weights is the baseline a harm mask must beat: if random
weights hurt harmful and benign text alike, the harm mask's selectivity is what matters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harmjax.masks.algebra import _check_bool, hf_sorted_leaves
from harmjax.tree import unflatten


def random_like(mask: Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
    """A random bool mask with exactly as many True entries as `mask` in each matrix (hence in
    each layer and projection), at uniformly random positions; deterministic in `seed`.

    Matrix i (in HF order) draws its positions from NumPy's generator seeded with (seed, i),
    so a matrix's control does not depend on which other matrices the mask covers. Positions
    are drawn on the host without replacement (O(k), where a device permutation of every
    matrix would cost a sort of all its entries), and each leaf is placed in `mask`'s
    sharding.
    """
    _check_bool(mask, "mask")
    out = {}
    for i, (name, leaf) in enumerate(hf_sorted_leaves(mask)):
        k = int(jnp.sum(leaf))
        size = int(np.prod(leaf.shape, dtype=np.int64))
        chosen = np.zeros(size, bool)
        chosen[np.random.default_rng([seed, i]).choice(size, size=k, replace=False)] = True
        chosen = chosen.reshape(leaf.shape)
        sharding = getattr(leaf, "sharding", None)
        out[name] = jax.device_put(chosen, sharding) if sharding is not None else jnp.asarray(chosen)
    return unflatten(out)
