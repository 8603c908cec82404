"""Attribution score units of the experiments: scans written to unit directories, the stage
key, the disk check (shared), and the main experiment's units: signed SNIP per harm category
(their sum is the score of the whole pruning set, since S = -W * sum_i dL_i/dW is linear in the
examples), and one pass over the retain set giving both the retain (utility) score and the
benign signed score (for the benign-data mask of the overlap analysis).

Two storage modes (docs/design_runs.md "Disk: no dense score tree"):
  - sparse (the default, `top_fraction` given): each unit stores, per matrix (per expert
    group in a MoE file with one leaf per expert), only the top floor(top_fraction * |M|) entries of its score tree in `select`'s ranking order
    (`harmjax.masks.sparse`), a few MB even at 32B; masks built from them are bit-identical
    to `select` on the dense trees at granularity "matrix". No dense tree touches the disk,
    so scans keep no mid-scan checkpoint (a dense float32 accumulator tree is 124 GB at
    32B): a kill costs the scan pass in progress. Every unit, `harm_all` included (one scan
    over the whole pruning set), is its own scan, so the device holds one score tree.
  - dense (`top_fraction=None`): each unit is a dense float32 score tree (orbax), each scan
    checkpoints as it goes and resumes at its last saved batch; the disk check applies.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from harmjax import distributed
from harmjax.attribution import scan
from harmjax.attribution import scored_names
from harmjax.data.records import Example
from harmjax.io.disk_space import human_bytes, require_free_space
from harmjax.experiments.core.stages import finish_unit, fresh_dir, slug, unit_done
from harmjax.masks.groups import expert_groups, unit_sizes
from harmjax.masks.sparse import top_candidates
from harmjax.masks.storage import GROUPED, save_candidates, save_scores
from harmjax.model.param_specs import param_specs
from harmjax.tree import flatten


# Scan knobs that only trade speed for memory. They change the compiled program, so on a GPU
# the bf16 forward and backward may be partitioned and rounded differently: scores agree to
# rounding, not bitwise (docs/design.md "Attribution: scores across compilations": up to 21% of the largest
# accumulator entry on random 14B weights; about 1% of a top-q set on the embedded model).
_SPEED_KNOBS = ("remat", "layerwise", "abs_chunk", "checkpoint_every", "separate_retain_passes")


def score_settings(scoring) -> dict[str, Any]:
    """The scoring config as it enters a scores stage's key: without the knobs that only trade
    speed for memory, so a run refused for memory and resumed with a smaller batch or remat
    keeps its finished units (as DeviceMemoryError promises). Dense mode keeps batch size and
    buckets in the key: its mid-scan checkpoint is a position in that batching."""
    drop = set(_SPEED_KNOBS) if scoring.get("keep_dense_scores") else {*_SPEED_KNOBS, "batch_size", "num_buckets"}
    return {k: v for k, v in scoring.to_dict().items() if k not in drop}


def scan_kwargs(scoring_cfg, progress: bool) -> dict[str, Any]:
    """`harmjax.attribution.scan` keyword arguments from a config's scoring block."""
    return dict(batch_size=scoring_cfg.batch_size, text_format=scoring_cfg.text_format,
                max_length=scoring_cfg.max_length, num_buckets=scoring_cfg.num_buckets, remat=scoring_cfg.remat,
                layerwise=scoring_cfg.layerwise, abs_chunk=scoring_cfg.abs_chunk,
                checkpoint_every=scoring_cfg.checkpoint_every, progress=progress)


def write_score_unit(target: str, tree, summary: Mapping[str, Any], top_fraction: float | None) -> None:
    """Writes one score unit: the dense tree (`top_fraction=None`) or its top candidates."""
    tmp = fresh_dir(target)
    if top_fraction is None:
        save_scores(tmp, tree, summary, safetensors=False)
    else:
        shapes = {n: tuple(x.shape) for n, x in flatten(tree).items()}
        save_candidates(tmp, top_candidates(tree, top_fraction), shapes, {**summary, "top_fraction": top_fraction})
    finish_unit(tmp, target, {k: summary[k] for k in ("kind", "num_examples", "num_tokens", "mean_loss", "seconds")
                              if k in summary})


def _scan(model, examples, kind, unit: str, scan_kwargs: Mapping[str, Any], top_fraction: float | None):
    # Dense mode checkpoints mid-scan beside the unit; sparse mode writes no dense state.
    ckpt = unit + ".ckpt" if top_fraction is None else None
    result = scan(model, examples, kind, checkpoint_dir=ckpt, **scan_kwargs)
    stats = {"num_examples": result.num_examples, "num_tokens": result.num_tokens,
             "mean_loss": result.mean_loss, "seconds": result.seconds}
    return result, stats, ckpt


def scan_to_units(model, examples, kind, unit: str, scan_kwargs: Mapping[str, Any], summary: Mapping[str, Any],
                  names: Mapping[str, str] | None = None, top_fraction: float | None = None) -> None:
    """Scans `examples` and writes each score tree to its unit dir (`names` maps a kind to its
    dir; a single kind goes to `unit`): dense, checkpointing the scan beside it, or as
    candidates (`top_fraction`)."""
    result, stats, ckpt = _scan(model, examples, kind, unit, scan_kwargs, top_fraction)
    trees = result.scores if isinstance(kind, tuple) else {kind: result.scores}
    for k, tree in trees.items():
        t0 = time.perf_counter()
        target = (names or {}).get(k, unit)
        write_score_unit(target, tree, {**summary, "kind": k, **stats}, top_fraction)
        # Where a unit's time goes at scale (the scan's own seconds include its compilation).
        logging.info("Score unit %s: scan %.1f s, %s written in %.1f s.", os.path.basename(target),
                     stats["seconds"], "dense tree" if top_fraction is None else "candidates",
                     time.perf_counter() - t0)
    if ckpt and distributed.is_writer():
        shutil.rmtree(ckpt, ignore_errors=True)


def score_tree_bytes(config) -> int:
    """Bytes of one float32 score tree over the default scope (the seven projections)."""
    specs = param_specs(config)
    return 4 * sum(int(np.prod(specs[n].shape)) for n in scored_names(config))


def candidate_bytes(config, top_fraction: float) -> int:
    """Bytes of one candidates unit: per selection unit (a matrix, or a MoE layer's experts of
    one kind, `harmjax.masks.groups`) floor(f * |unit|) int64 indices + float32 scores."""
    specs = param_specs(config)
    sizes = {n: int(np.prod(specs[n].shape)) for n in scored_names(config)}
    return 12 * sum(int(math.floor(top_fraction * size)) for size in unit_sizes(sizes))


def selection_key(config) -> dict[str, str]:
    """What a scores stage's key adds for a model whose per-expert leaves are ranked together
    ({} for every other model, so their cached units stay valid): candidates selected per
    expert matrix before grouping must not serve masks now."""
    return {"selection_units": GROUPED} if expert_groups(scored_names(config)) else {}


def check_score_disk(model, directory: str, units: Sequence[str], checkpoint_trees: int = 1,
                     top_fraction: float | None = None) -> None:
    """Fails at once, before any scan, when the score units still to write cannot fit.

    `units` are the unit names the stage writes under `directory`; finished ones are not
    counted. Dense mode (`top_fraction=None`): one float32 tree each, plus `checkpoint_trees`
    trees of scan checkpoint beside the last units (2 for a two-kind pass). Sparse mode: the
    candidates only (no checkpoint is written).
    """
    remaining = sum(not unit_done(os.path.join(directory, u)) for u in units)
    if not remaining:
        return
    fix = ("Free some space or set output_dir to a larger disk; finished stages and units are kept, "
           "and the rerun resumes where this one stopped.")
    if top_fraction is None:
        tree = score_tree_bytes(model.config)
        require_free_space(
            directory, (remaining + checkpoint_trees) * tree,
            f"The scores stage ({remaining} float32 score trees of {human_bytes(tree)}, plus a scan checkpoint)", fix,
        )
    else:
        unit = candidate_bytes(model.config, top_fraction) + 4096  # + header and summary
        require_free_space(directory, remaining * unit,
                           f"The scores stage ({remaining} candidate units of {human_bytes(unit)})", fix)


def experiment_score_units(examples: Sequence[Example]) -> list[str]:
    """The units `harm_scores_per_category` and `benign_scores` write for these examples."""
    cats = sorted({slug(e.category) for e in examples})
    return [f"harm_{c}" for c in cats] + ["harm_all", "retain", "benign_signed"]


def harm_scores_per_category(
    model, examples: Sequence[Example], directory: str, scan_kwargs: Mapping[str, Any], summary: Mapping[str, Any],
    top_fraction: float | None = None, kind: str = "harm",
) -> dict[str, Any]:
    """Writes `harm_<category>` per category and `harm_all` under `directory`; returns
    {category: unit path} plus "all". Dense units with `top_fraction=None`, else candidates
    (see the module docstring). `kind` is the harm side's score kind (signed SNIP, "harm",
    by default; "wanda" or "magnitude" for those baselines: wanda's input sums are additive
    over examples too, but its score, a square root of them, is not a sum of category scores).

    `harm_all` is the score of the whole pruning set, S = -W * sum_i dL_i/dW over every
    example, from one scan over all of them: S is linear in the examples, so it equals the
    sum of the category trees within float32 rounding (tested), and every unit stands alone,
    so a kill costs only the unit in progress. (Summing the category trees instead kept a
    float32 tree of the model's size in host memory and moved it over PCIe twice per
    category: 131 GB each way at 32B.)"""
    cats = sorted({e.category for e in examples})
    units = {cat: os.path.join(directory, f"harm_{slug(cat)}") for cat in cats}
    total = os.path.join(directory, "harm_all")
    for cat in cats:
        if not unit_done(units[cat]):
            subset = [e for e in examples if e.category == cat]
            scan_to_units(model, subset, kind, units[cat], scan_kwargs,
                          {**summary, "category": cat, "nsamples": len(subset)}, top_fraction=top_fraction)
    if not unit_done(total):
        scan_to_units(model, examples, kind, total, scan_kwargs,
                      {**summary, "category": "all", "nsamples": len(examples),
                       "note": "one scan over every pruning example (the sum of the category scores)"},
                      top_fraction=top_fraction)
    return {**units, "all": total}


def benign_scores(
    model, examples: Sequence[Example], directory: str, retain_kind: str, scan_kwargs: Mapping[str, Any],
    summary: Mapping[str, Any], top_fraction: float | None = None, separate_passes: bool = False,
) -> dict[str, str]:
    """`retain` (the utility score, `retain_kind`: "retain", "retain_mean", "wanda" or
    "magnitude") and `benign_signed` (signed SNIP on benign answers) over the retain set: from
    one two-kind pass, or with `separate_passes` from one
    pass each (half the accumulator memory: a 32B two-kind pass holds 2 float32 trees, 248
    GB). Returns {"retain": path, "benign_signed": path}."""
    units = {"retain": os.path.join(directory, "retain"), "benign_signed": os.path.join(directory, "benign_signed")}
    s = {**summary, "nsamples": len(examples)}
    if separate_passes:
        for key, kind in (("retain", retain_kind), ("benign_signed", "harm")):
            if not unit_done(units[key]):
                scan_to_units(model, examples, kind, units[key], scan_kwargs, s, top_fraction=top_fraction)
    elif not all(unit_done(u) for u in units.values()):
        scan_to_units(model, examples, (retain_kind, "harm"), units["retain"], scan_kwargs, s,
                      names={retain_kind: units["retain"], "harm": units["benign_signed"]}, top_fraction=top_fraction)
    return units
