"""Masks from score units, for every experiment: T_q(scores[key]) \\ T_p(scores["retain"]) from
per-matrix candidates (`harmjax.masks.sparse`, bit-identical to `select` on dense scores) or
from dense score trees through `select`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harmjax.masks import (
    difference, load_candidates, load_scores, mask_from_indices, mask_indices, select, select_indices,
)
from harmjax.masks.storage import has_candidates
from harmjax.tree import iter_leaves


def harm_minus_spared(harm, spared, q: float, granularity: str):
    """T_q(harm) \\ spared, where `spared` = T_p(retain) was selected once for all masks."""
    return difference(select(harm, None, q=q, granularity=granularity, progress=False), spared)


def select_from_units(scores: Mapping[str, str], key: str, q: float, p: float, granularity: str, shardings):
    """T_q(scores[key]) \\ T_p(scores["retain"]) from score units of either kind (candidates or
    dense trees), as a bool mask in `shardings`."""
    if all(has_candidates(d) for d in scores.values()):
        if granularity != "matrix":
            raise ValueError(f"Score candidates serve granularity 'matrix' only, not {granularity!r}.")
        return mask_from_indices(*sparse_selectors(scores, p)[0](key, q), shardings)
    return dense_selectors(scores, p, granularity, shardings, sparse_out=False)[0](key, q)


def sparse_selectors(scores: Mapping[str, str], p: float):
    """(harm_mask(key, q), top_mask(key, q)) built from candidates, each returning the mask as
    ({HF name: sorted flat indices}, {HF name: shape}). Candidates are small (MBs), so all of
    them may stay loaded."""
    cands: dict[str, Any] = {}

    def cand(key):
        if key not in cands:
            cands[key] = load_candidates(scores[key])[:2]
        return cands[key]

    def harm_mask(key, q):
        (harm, shapes), (retain, _) = cand(key), cand("retain")
        return select_indices(harm, retain, shapes, q, p), shapes

    def top_mask(key, q):
        harm, shapes = cand(key)
        return select_indices(harm, None, shapes, q), shapes

    return harm_mask, top_mask


def dense_selectors(scores: Mapping[str, str], p: float, granularity: str, shardings, sparse_out: bool = True):
    """(harm_mask(key, q), top_mask(key, q)) from dense score trees via `select`, each mask as
    (indices, shapes) like `sparse_selectors`, or as the bool tree with `sparse_out=False`."""

    def out(mask):
        if not sparse_out:
            return mask
        return mask_indices(mask), {n: tuple(x.shape) for n, x in iter_leaves(mask)}

    cache: dict[str, Any] = {}
    spared = None

    def scores_of(key):
        if key not in cache:
            if len(cache) >= 2:  # at most two score trees in memory (an 8B tree is 28 GiB in float32)
                cache.pop(next(k for k in cache if k != "retain"))
            cache[key] = load_scores(scores[key], shardings)[0]
        return cache[key]

    def harm_mask(key, q):
        # T_q(harm) \ T_p(retain), with T_p selected once for every mask (half the work).
        nonlocal spared
        if spared is None:
            spared = select(scores_of("retain"), None, q=p, granularity=granularity, progress=False)
        return out(harm_minus_spared(scores_of(key), spared, q, granularity))

    def top_mask(key, q):
        return out(select(scores_of(key), None, q=q, granularity=granularity, progress=False))

    return harm_mask, top_mask
