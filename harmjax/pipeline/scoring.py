"""Attribution scores of the experiment: signed SNIP per harm category (their sum is the score of
the whole pruning set, since S = -W * sum_i dL_i/dW is linear in the examples), and one pass over
the retain set giving both the retain (utility) score and the benign signed score (for the
benign-data mask of the overlap analysis).

Each score tree is a unit directory; each scan checkpoints as it goes, so a kill mid-scan
resumes at its last saved batch.
"""

from __future__ import annotations

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
from harmjax.masks.storage import load_scores, save_scores
from harmjax.model.param_specs import param_specs
from harmjax.pipeline.stages import finish_unit, fresh_dir, slug, unit_done
from harmjax.sharding import param_shardings


def scan_to_units(model, examples, kind, unit: str, scan_kwargs: Mapping[str, Any], summary: Mapping[str, Any],
                  names: Mapping[str, str] | None = None) -> None:
    """Scans `examples` and writes each score tree to its unit dir (`names` maps a kind to its
    dir; a single kind goes to `unit`), checkpointing the scan beside it."""
    ckpt = unit + ".ckpt"
    result = scan(model, examples, kind, checkpoint_dir=ckpt, **scan_kwargs)
    trees = result.scores if isinstance(kind, tuple) else {kind: result.scores}
    stats = {"num_examples": result.num_examples, "num_tokens": result.num_tokens,
             "mean_loss": result.mean_loss, "seconds": result.seconds}
    for k, tree in trees.items():
        target = (names or {}).get(k, unit)
        tmp = fresh_dir(target)
        save_scores(tmp, tree, {**summary, "kind": k, **stats}, safetensors=False)
        finish_unit(tmp, target, {"kind": k, **stats})
    if distributed.is_writer():
        shutil.rmtree(ckpt, ignore_errors=True)


def score_tree_bytes(config) -> int:
    """Bytes of one float32 score tree over the default scope (the seven projections)."""
    specs = param_specs(config)
    return 4 * sum(int(np.prod(specs[n].shape)) for n in scored_names(config))


def check_score_disk(model, directory: str, units: Sequence[str], checkpoint_trees: int = 1) -> None:
    """Fails at once, before any scan, when the score trees still to write cannot fit.

    `units` are the unit names the stage writes under `directory`, one float32 tree each;
    finished ones are not counted. `checkpoint_trees`: the trees a scan checkpoint holds
    beside the last units (2 for a two-kind pass).
    """
    remaining = sum(not unit_done(os.path.join(directory, u)) for u in units)
    if remaining:
        tree = score_tree_bytes(model.config)
        require_free_space(
            directory, (remaining + checkpoint_trees) * tree,
            f"The scores stage ({remaining} float32 score trees of {human_bytes(tree)}, plus a scan checkpoint)",
            "Free some space or set output_dir to a larger disk; finished stages and units are kept, "
            "and the rerun resumes where this one stopped.",
        )


def experiment_score_units(examples: Sequence[Example]) -> list[str]:
    """The units `harm_scores_per_category` and `benign_scores` write for these examples."""
    cats = sorted({slug(e.category) for e in examples})
    return [f"harm_{c}" for c in cats] + ["harm_all", "retain", "benign_signed"]


def harm_scores_per_category(
    model, examples: Sequence[Example], directory: str, scan_kwargs: Mapping[str, Any], summary: Mapping[str, Any]
) -> dict[str, Any]:
    """Writes `harm_<category>` per category and `harm_all` (their sum) under `directory`;
    returns {category: unit path} plus "all"."""
    cats = sorted({e.category for e in examples})
    units = {}
    for cat in cats:
        unit = os.path.join(directory, f"harm_{slug(cat)}")
        units[cat] = unit
        if not unit_done(unit):
            subset = [e for e in examples if e.category == cat]
            scan_to_units(model, subset, "harm", unit, scan_kwargs, {**summary, "category": cat, "nsamples": len(subset)})
    total = os.path.join(directory, "harm_all")
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
    units["all"] = total
    return units


def benign_scores(
    model, examples: Sequence[Example], directory: str, retain_kind: str, scan_kwargs: Mapping[str, Any],
    summary: Mapping[str, Any],
) -> dict[str, str]:
    """One pass over the retain set: `retain` (the utility score, `retain_kind`) and
    `benign_signed` (signed SNIP on benign answers). Returns {"retain": path, "benign_signed": path}."""
    units = {"retain": os.path.join(directory, "retain"), "benign_signed": os.path.join(directory, "benign_signed")}
    if not all(unit_done(u) for u in units.values()):
        kinds = (retain_kind, "harm")
        scan_to_units(model, examples, kinds, units["retain"], scan_kwargs, {**summary, "nsamples": len(examples)},
                      names={retain_kind: units["retain"], "harm": units["benign_signed"]})
    return units
