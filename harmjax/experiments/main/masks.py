"""The experiment's masks: T_q(harm) \\ T_p(retain) over a sweep of q, a random control of the
same size in every matrix for each q, one mask per harm category, and a benign-data mask.
Each mask is a unit directory written by `harmjax.masks.save_mask_indices` (sparse indices; the
dense uint8 copy only with `dense_copy`): masks stay indices from selection to disk.

Masks are selected from the scores stage's candidates (per matrix top entries, see
`harmjax.masks.sparse`), bit-identical to `select` on dense scores; dense score units (kept on
request, or for granularity "row"/"global") go through `select` as before.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from harmjax.experiments.core.selection import dense_selectors, sparse_selectors
from harmjax.experiments.core.stages import finish_unit, fresh_dir, slug, unit_done
from harmjax.masks import jaccard_indices, load_mask_indices, mask_from_indices
from harmjax.masks.random import random_indices
from harmjax.masks.storage import has_candidates, read_summary, save_mask_indices
from harmjax.sharding import param_shardings


def _save(unit: str, indices, shapes, summary: Mapping[str, Any], num_params: int, dense_shardings=None) -> None:
    # Masks stay sparse from selection to disk: a 32B model's dense mask is 31 GB.
    tmp = fresh_dir(unit)
    # The dense uint8 copy (7 GiB at 8B, 31 GB at 32B) only for harm masks, and only on request.
    dense = (mask_from_indices(indices, shapes, dense_shardings)
             if dense_shardings is not None and summary["mask_kind"] == "harm" else None)
    save_mask_indices(tmp, indices, shapes, summary, num_params=num_params, dense=dense)
    finish_unit(tmp, unit, {"name": summary["name"]})


def _entry(unit: str) -> dict[str, Any]:
    s = read_summary(unit)
    return {
        "name": s["name"], "kind": s["mask_kind"], "q": s.get("q"), "p": s.get("p"), "category": s.get("category"),
        "dir": unit, "total": s["counts"]["total"], "fraction": s["fraction_pruned"],
        "fraction_params": s["fraction_pruned_params"],
    }


def q_label(q: float) -> str:
    """A file-name-safe label of a fraction: 1e-05 -> "1e-05"."""
    return f"{q:.0e}" if q < 0.01 else f"{q:g}"


def build_masks(
    model,
    scores: Mapping[str, str],
    directory: str,
    *,
    q_sweep: Sequence[float],
    p: float,
    category_q: float,
    granularity: str,
    seed: int,
    random_control: bool = True,
    dense_copy: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Builds every mask under `directory` (skipping finished ones); returns one entry per
    mask (name, kind, q, p, category, dir, total, fraction, fraction_params).

    `scores` maps "all", each category, "retain" and "benign_signed" to score dirs, all
    candidates (granularity "matrix" only) or all dense trees. `dense_copy`: also write the
    dense uint8 `mask.safetensors` of each harm mask.
    """
    from tqdm import tqdm

    shardings = param_shardings(model.config, model.mesh)
    n_params = model.num_params()
    categories = [c for c in scores if c not in ("all", "retain", "benign_signed")]
    total = len(q_sweep) * (2 if random_control else 1) + len(categories) + 1  # + the benign mask
    bar = tqdm(total=total, desc="masks", unit="mask", disable=not progress)
    sparse = all(has_candidates(d) for d in scores.values())
    if sparse and granularity != "matrix":
        raise ValueError(f"Score candidates serve granularity 'matrix' only, not {granularity!r}; "
                         "rerun the scores stage with scoring.keep_dense_scores=True.")
    if sparse:
        harm_mask, top_mask = sparse_selectors(scores, p)
    else:
        harm_mask, top_mask = dense_selectors(scores, p, granularity, shardings)

    units = []
    common = {"p": p, "granularity": granularity, "seed": seed}
    dense = shardings if dense_copy else None
    for q in q_sweep:
        unit = os.path.join(directory, f"harm_q{q_label(q)}")
        units.append(unit)
        indices = None
        if not unit_done(unit):
            indices, shapes = harm_mask("all", q)
            _save(unit, indices, shapes, {"name": f"harm q={q_label(q)}", "mask_kind": "harm", "q": q, **common},
                  n_params, dense)
        bar.update(1)
        if random_control:
            runit = os.path.join(directory, f"random_q{q_label(q)}")
            units.append(runit)
            if not unit_done(runit):
                if indices is None:  # the harm mask was finished by an earlier run
                    indices, shapes = load_mask_indices(unit)
                control = random_indices({n: len(i) for n, i in indices.items()}, shapes, seed)
                _save(runit, control, shapes, {"name": f"random q={q_label(q)}", "mask_kind": "random", "q": q,
                                               **common}, n_params, dense)
            bar.update(1)
    for cat in categories:
        unit = os.path.join(directory, f"category_{slug(cat)}")
        units.append(unit)
        if not unit_done(unit):
            indices, shapes = harm_mask(cat, category_q)
            _save(unit, indices, shapes, {"name": cat, "mask_kind": "category", "category": cat, "q": category_q,
                                          **common}, n_params, dense)
        bar.update(1)
    unit = os.path.join(directory, "benign")
    units.append(unit)
    if not unit_done(unit):
        # The benign-data mask: top-q signed SNIP on benign answers, no T_p (the retain set is
        # the same data, and T_p holds most of it: 79% on the embedded model). Claim 2's
        # same-procedure baseline, T_q(benign) \ T_p(retain), is built in `baselines.py`.
        indices, shapes = top_mask("benign_signed", category_q)
        _save(unit, indices, shapes, {"name": "benign", "mask_kind": "benign", "q": category_q, "p": 0.0,
                                      "granularity": granularity, "seed": seed}, n_params, dense)
    bar.update(1)
    bar.close()
    return [_entry(u) for u in units]


def mask_overlap(model, entries) -> dict[str, Any]:
    """Pairwise Jaccard overlap of the category masks and the benign-data mask:
    {"labels": [...], "matrix": [[...]]}, in the order categories (sorted), then benign. Pairs
    with an empty mask (q too small for the matrices: floor(q * size) = 0) are None.
    Computed from the masks' indices: no dense mask is built."""
    chosen = sorted((e for e in entries if e["kind"] == "category"), key=lambda e: e["name"])
    chosen += [e for e in entries if e["kind"] == "benign"]
    sets = [load_mask_indices(e["dir"])[0] for e in chosen]
    n = len(sets)
    matrix = [[1.0 if i == j else None for j in range(n)] for i in range(n)]
    empty = [sum(len(v) for v in s.values()) == 0 for s in sets]
    for i in range(n):
        for j in range(i + 1, n):
            # Two empty masks are equal sets (jaccard 1.0), but that says nothing about overlap.
            value = None if empty[i] or empty[j] else float(jaccard_indices(sets[i], sets[j]))
            matrix[i][j] = matrix[j][i] = value
    return {"labels": [e["name"] for e in chosen], "matrix": matrix}
