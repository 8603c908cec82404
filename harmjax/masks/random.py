"""Random control masks: the same number of pruned weights in every matrix (every selection
unit: a MoE layer's per-expert leaves of one kind draw their total together, see
`harmjax.masks.groups`), at uniformly random positions. Pruning that many random weights is the baseline a harm mask must beat: if random
weights hurt harmful and benign text alike, the harm mask's selectivity is what matters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from harmjax.masks.algebra import check_bool, hf_order_key, hf_sorted_leaves, leaf_true_counts
from harmjax.masks.groups import selection_units


def random_indices(counts: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]], seed: int = 0,
                   ) -> dict[str, np.ndarray]:
    """A random sparse mask: per HF name, `counts[name]` sorted int64 flat indices drawn
    uniformly without replacement from the matrix of `shapes[name]`; deterministic in `seed`.

    Matrix i (in HF order) draws from NumPy's generator seeded with (seed, i), so a matrix's
    control does not depend on which other matrices the mask covers. A MoE expert group
    (`harmjax.masks.groups`) draws its members' summed count uniformly over all its entries at
    once, seeded by its first member in HF order, so the count per expert is random too, as in
    a fused checkpoint's tensor. The draw is O(k) on the host (a device permutation of every
    matrix would cost a sort of all its entries) and no dense array is made: a 32B model's
    dense mask is 31 GB.
    """
    order = sorted(shapes, key=hf_order_key)
    position = {name: i for i, name in enumerate(order)}
    out = {}
    for unit in selection_units(order):
        sizes = [int(np.prod(shapes[name], dtype=np.int64)) for name in unit]
        k = sum(int(counts.get(name, 0)) for name in unit)
        rng = np.random.default_rng([seed, min(position[name] for name in unit)])
        chosen = np.sort(rng.choice(sum(sizes), size=k, replace=False)).astype(np.int64)
        starts = np.cumsum([0] + sizes)
        cuts = np.searchsorted(chosen, starts)
        for j, name in enumerate(unit):  # a group's entries end to end, in expert order
            out[name] = chosen[cuts[j]: cuts[j + 1]] - starts[j]
    return {name: out[name] for name in order}


def random_like(mask: Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
    """A random bool mask with exactly as many True entries as `mask` in each matrix (hence in
    each layer and projection; a MoE expert group's summed), at uniformly random positions
    (`random_indices`, the same positions for the same counts and seed), each leaf in
    `mask`'s sharding."""
    from harmjax.masks.sparse import mask_from_indices

    check_bool(mask, "mask")
    items = hf_sorted_leaves(mask)
    shapes = {name: tuple(leaf.shape) for name, leaf in items}
    counts = dict(zip(shapes, leaf_true_counts([leaf for _, leaf in items])))
    shardings = {name: leaf.sharding for name, leaf in items if isinstance(leaf, jax.Array)}
    return mask_from_indices(random_indices(counts, shapes, seed), shapes, shardings)
