"""What the experiment writes, in bytes, from the model's shapes and the experiment settings
alone: the README's disk table and a check before a large run (no weights needed).

Sparse mode (the default): each score unit holds per matrix floor(f * |M|) candidates of 12
bytes (int64 index + float32 score), f = the largest q, category_q and p; each mask holds at
most floor(q * |M|) int64 indices per matrix (T_p removes some); in a MoE file with one leaf per
expert, M is a layer's experts of one kind (`harmjax.masks.groups`), and so does each of the
benign \\ retain baselines the benign-cost search builds (at most `max_searched` of them).
Dense mode (`scoring.keep_dense_scores`): each unit is a float32 tree, plus a two-tree scan
checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from harmjax.attribution import scored_names
from harmjax.experiments.main.baselines import max_searched
from harmjax.masks.groups import unit_sizes
from harmjax.model.param_specs import param_specs

_HEADER_PER_TENSOR = 200  # safetensors header entry + shapes metadata, bytes (generous)


def _sizes(config) -> list[int]:
    specs = param_specs(config)
    return [int(np.prod(specs[n].shape)) for n in scored_names(config)]


def _unit_sizes(config) -> list[int]:
    # Candidates are kept per selection unit: a MoE layer's per-expert leaves of one kind together.
    specs = param_specs(config)
    return unit_sizes({n: int(np.prod(specs[n].shape)) for n in scored_names(config)})


def experiment_output_bytes(config, cfg, n_categories: int) -> dict[str, Any]:
    """Bytes the experiment's scores and masks stages write for `config` under settings `cfg`
    (configs/embedded.py fields) with `n_categories` harm categories: {"scored": N, "scores":
    bytes, "masks": bytes, "total": bytes, "dense_tree": one float32 tree, "dense_mask": one
    uint8 mask, "baselines": claim 2's benign \\ retain masks}. Answers, evaluation JSON, report and
    plots (a few MB) are not counted."""
    sizes = _sizes(config)
    n = sum(sizes)
    M, S = cfg.masks, cfg.scoring
    units = n_categories + 3  # categories, harm_all, retain, benign_signed
    header = _HEADER_PER_TENSOR * len(sizes)
    if S.keep_dense_scores or M.granularity != "matrix":
        scores = (units + 2) * 4 * n  # + a two-kind scan checkpoint
    else:
        f = max([*M.q_sweep, M.category_q, M.p])
        scores = units * (12 * sum(math.floor(f * s) for s in _unit_sizes(config)) + 2 * header)

    def mask(q):
        return 8 * sum(math.floor(q * s) for s in _unit_sizes(config)) + header

    masks = sum(mask(q) * (2 if M.random_control else 1) for q in M.q_sweep)
    masks += (n_categories + 1) * mask(M.category_q)
    if M.dense_copy:
        masks += len(M.q_sweep) * n
    # Claim 2's benign \ retain baselines: every q the benign-cost search evaluates, each at most q_max.
    baselines = 0
    B = cfg.get("baselines")
    if B is not None and B.enabled:
        q_max = max([*M.q_sweep, M.category_q, M.p])
        baselines = max_searched(M.category_q, q_max, B.match_steps) * mask(q_max)
    return {"scored": n, "scores": scores, "masks": masks, "baselines": baselines,
            "total": scores + masks + baselines, "dense_tree": 4 * n, "dense_mask": n}
