"""Masks over a model's scored weights: selection from scores, set algebra, application to
params, storage (HF-named safetensors: sparse indices by default) and a per-layer plot.

  mask = select(harm_scores, retain_scores, q=1e-5, p=5e-5)       # bool tree, True = prune
  pruned = apply_mask(model.params, mask)                          # new params, weights zeroed
  save_mask("runs/mask", mask, {"q": 1e-5, "p": 5e-5, ...})        # mask_indices.safetensors, summary.json
  summary(mask, params); compare(mask_a, mask_b)                     # tables in notebooks and print
"""

from harmjax.masks.algebra import (
    MaskMismatchError,
    complement,
    count,
    difference,
    format_counts,
    hf_order_key,
    intersect_all,
    intersection,
    jaccard,
    mask_counts,
    union,
    union_all,
)
from harmjax.masks.apply import apply_mask, check_mask_fits
from harmjax.masks.display import MaskComparison, MaskSummary, ScoreSummary, compare, summary
from harmjax.masks.random import random_indices, random_like
from harmjax.masks.plots import PlotDependencyError, counts_grid, plot_mask_counts
from harmjax.masks.select import GRANULARITIES, iter_select, select
from harmjax.masks.sparse import jaccard_indices, mask_from_indices, mask_indices, select_indices, top_candidates
from harmjax.masks.storage import (
    export_safetensors,
    load_candidates,
    load_mask,
    load_mask_indices,
    load_safetensors_tree,
    load_scores,
    read_summary,
    safetensors_shapes,
    save_candidates,
    save_mask,
    save_mask_indices,
    save_scores,
)

__all__ = [
    "GRANULARITIES",
    "MaskComparison",
    "MaskMismatchError",
    "MaskSummary",
    "PlotDependencyError",
    "ScoreSummary",
    "apply_mask",
    "check_mask_fits",
    "compare",
    "complement",
    "count",
    "counts_grid",
    "difference",
    "export_safetensors",
    "format_counts",
    "hf_order_key",
    "iter_select",
    "intersect_all",
    "intersection",
    "jaccard",
    "jaccard_indices",
    "load_candidates",
    "load_mask",
    "load_mask_indices",
    "load_safetensors_tree",
    "load_scores",
    "mask_counts",
    "mask_from_indices",
    "mask_indices",
    "plot_mask_counts",
    "random_indices",
    "random_like",
    "read_summary",
    "safetensors_shapes",
    "save_candidates",
    "save_mask",
    "save_mask_indices",
    "save_scores",
    "select",
    "select_indices",
    "summary",
    "top_candidates",
    "union",
    "union_all",
]
