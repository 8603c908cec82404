"""Random control masks: the same number of pruned weights in every matrix, at uniformly random
positions. Pruning that many random weights is the baseline a harm mask must beat: if random
weights hurt harmful and benign text alike, the harm mask's selectivity is what matters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from harmjax.masks.algebra import check_bool, hf_order_key, hf_sorted_leaves, leaf_true_counts


def random_indices(counts: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]], seed: int = 0,
                   ) -> dict[str, np.ndarray]:
    """A random sparse mask: per HF name, `counts[name]` sorted int64 flat indices drawn
    uniformly without replacement from the matrix of `shapes[name]`; deterministic in `seed`.

    Matrix i (in HF order) draws from NumPy's generator seeded with (seed, i), so a matrix's
    control does not depend on which other matrices the mask covers. The draw is O(k) on the
    host (a device permutation of every matrix would cost a sort of all its entries) and no
    dense array is made: a 32B model's dense mask is 31 GB.
    """
    out = {}
    for i, name in enumerate(sorted(shapes, key=hf_order_key)):
        size = int(np.prod(shapes[name], dtype=np.int64))
        chosen = np.random.default_rng([seed, i]).choice(size, size=int(counts.get(name, 0)), replace=False)
        out[name] = np.sort(chosen).astype(np.int64)
    return out


def random_like(mask: Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
    """A random bool mask with exactly as many True entries as `mask` in each matrix (hence in
    each layer and projection), at uniformly random positions (`random_indices`, the same
    positions for the same counts and seed), each leaf in `mask`'s sharding."""
    from harmjax.masks.sparse import mask_from_indices

    check_bool(mask, "mask")
    items = hf_sorted_leaves(mask)
    shapes = {name: tuple(leaf.shape) for name, leaf in items}
    counts = dict(zip(shapes, leaf_true_counts([leaf for _, leaf in items])))
    shardings = {name: leaf.sharding for name, leaf in items if isinstance(leaf, jax.Array)}
    return mask_from_indices(random_indices(counts, shapes, seed), shapes, shardings)
