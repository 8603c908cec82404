"""Attribution scores of the experiment: signed SNIP per harm category (their sum is the score of
the whole pruning set, since S = -W * sum_i dL_i/dW is linear in the examples), and one pass over
the retain set giving both the retain (utility) score and the benign signed score (for the
benign-data mask of the overlap analysis).

Two storage modes (see BUILD_NOTES "Disk"):
  - sparse (the default, `top_fraction` given): each unit stores, per matrix, only the top
    floor(top_fraction * |M|) entries of its score tree in `select`'s ranking order
    (`harmjax.masks.sparse`), a few MB even at 32B; masks built from them are bit-identical
    to `select` on the dense trees at granularity "matrix". No dense tree touches the disk,
    so scans keep no mid-scan checkpoint (a dense float32 accumulator tree is 124 GB at
    32B): a kill costs the scan pass in progress. `harm_all`, the sum of the per-category
    trees, is added up in memory as each category scan finishes, in the same order and with
    the same float32 additions as the dense mode (bitwise equal); the running sum waits in
    host memory while the next category is scanned, so the device holds one score tree.
  - dense (`top_fraction=None`): each unit is a dense float32 score tree (orbax), each scan
    checkpoints as it goes and resumes at its last saved batch; the disk check applies.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from harmjax import distributed
from harmjax.attribution import scan
from harmjax.attribution.scope import scored_names
from harmjax.data.records import Example
from harmjax.io.disk_space import human_bytes, require_free_space
from harmjax.masks.sparse import top_candidates
from harmjax.masks.storage import load_scores, save_candidates, save_scores
from harmjax.model.param_specs import param_specs
from harmjax.pipeline.stages import finish_unit, fresh_dir, slug, unit_done
from harmjax.sharding import param_shardings
from harmjax.tree import flatten, unflatten


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
        write_score_unit((names or {}).get(k, unit), tree, {**summary, "kind": k, **stats}, top_fraction)
    if ckpt and distributed.is_writer():
        shutil.rmtree(ckpt, ignore_errors=True)


def score_tree_bytes(config) -> int:
    """Bytes of one float32 score tree over the default scope (the seven projections)."""
    specs = param_specs(config)
    return 4 * sum(int(np.prod(specs[n].shape)) for n in scored_names(config))


def candidate_bytes(config, top_fraction: float) -> int:
    """Bytes of one candidates unit: per matrix floor(f * |M|) int64 indices + float32 scores."""
    specs = param_specs(config)
    return 12 * sum(int(math.floor(top_fraction * int(np.prod(specs[n].shape)))) for n in scored_names(config))


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
    top_fraction: float | None = None,
) -> dict[str, Any]:
    """Writes `harm_<category>` per category and `harm_all` (their sum) under `directory`;
    returns {category: unit path} plus "all". Dense units with `top_fraction=None`, else
    candidates (see the module docstring)."""
    cats = sorted({e.category for e in examples})
    units = {cat: os.path.join(directory, f"harm_{slug(cat)}") for cat in cats}
    total = os.path.join(directory, "harm_all")
    units_all = {**units, "all": total}
    if top_fraction is not None:
        if not unit_done(total):
            _sparse_harm_scans(model, examples, cats, units, total, scan_kwargs, summary, top_fraction)
        return units_all
    for cat in cats:
        if not unit_done(units[cat]):
            subset = [e for e in examples if e.category == cat]
            scan_to_units(model, subset, "harm", units[cat], scan_kwargs,
                          {**summary, "category": cat, "nsamples": len(subset)})
    if not unit_done(total):
        shardings = param_shardings(model.config, model.mesh)
        acc = None
        for cat in cats:
            tree, _ = load_scores(units[cat], shardings)
            acc = tree if acc is None else jax.tree.map(lambda a, b: a + b, acc, tree)
        tmp = fresh_dir(total)
        save_scores(tmp, acc, {**summary, "kind": "harm", "category": "all", "nsamples": len(examples),
                               "note": "sum of the per-category harm scores"}, safetensors=False)
        finish_unit(tmp, total, {"kind": "harm", "categories": cats})
    return units_all


def _to_host_memory(tree):
    """The tree moved to host memory in its own sharding (memory kind "pinned_host"), freeing
    the device for the next scan; left in place where the backend has no host memory kind."""
    def move(x):
        try:
            return jax.device_put(x, x.sharding.with_memory_kind("pinned_host"))
        except (ValueError, NotImplementedError, RuntimeError):
            return x

    return jax.tree.map(move, tree)


def _to_device_memory(tree):
    """The inverse of `_to_host_memory`: each leaf back in device memory, same sharding."""
    def move(x):
        kind = getattr(x.sharding, "memory_kind", None)
        return x if kind in (None, "device") else jax.device_put(x, x.sharding.with_memory_kind("device"))

    return jax.tree.map(move, tree)


def _add_into(acc, tree):
    """acc + tree per leaf, the sum landing back in host memory: each leaf of `acc` visits the
    device only for its own addition (the same float32 `a + b` as the dense mode's).

    Each old leaf is freed as soon as its sum exists, so host memory holds one running sum
    plus one leaf, not two sums: at 32B the sum is 58 GiB of pinned host memory per GPU,
    and a second copy overflowed XLA's 64 GB pinned-host pool (measured on 2 x H200)."""
    flat_acc, flat_tree = flatten(acc), flatten(tree)
    for name, b in flat_tree.items():
        a = flat_acc[name]
        total = jax.device_put(jax.device_put(a, b.sharding) + b, a.sharding)
        if total is not a and not a.is_deleted():
            a.delete()
        flat_acc[name] = total
    return unflatten(flat_acc)


def _sparse_harm_scans(model, examples, cats, units, total, scan_kwargs, summary, top_fraction) -> None:
    # Every category is scanned again when `harm_all` is missing: its sum needs each dense
    # tree, and none is on disk. Finished category units are not rewritten.
    acc = None
    for cat in cats:
        subset = [e for e in examples if e.category == cat]
        result, stats, _ = _scan(model, subset, "harm", units[cat], scan_kwargs, top_fraction)
        if not unit_done(units[cat]):
            write_score_unit(units[cat], result.scores, {**summary, "category": cat, "nsamples": len(subset),
                                                         "kind": "harm", **stats}, top_fraction)
        # Same order and additions as the dense mode: ((t0 + t1) + t2) + ...
        acc = _to_host_memory(result.scores) if acc is None else _add_into(acc, result.scores)
        del result
    # Back on the device for selection (the scans' accumulators are freed by now).
    info = {**summary, "kind": "harm", "category": "all", "nsamples": len(examples),
            "note": "sum of the per-category harm scores"}
    write_score_unit(total, _to_device_memory(acc), info, top_fraction)


def benign_scores(
    model, examples: Sequence[Example], directory: str, retain_kind: str, scan_kwargs: Mapping[str, Any],
    summary: Mapping[str, Any], top_fraction: float | None = None, separate_passes: bool = False,
) -> dict[str, str]:
    """`retain` (the utility score, `retain_kind`) and `benign_signed` (signed SNIP on benign
    answers) over the retain set: from one two-kind pass, or with `separate_passes` from one
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
