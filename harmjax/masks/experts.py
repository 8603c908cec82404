"""Where a mask falls in a mixture-of-experts model: pruned weights per (layer, expert) unit,
and how concentrated they are on a few units.

A unit is one expert of one layer: its gate, up and down matrices. Both checkpoint layouts
count the same way (`harmjax.model.moe_specs`): per-expert leaves
(`...experts.{e}.gate_proj.weight`) add their whole count to expert e, and gpt-oss' fused 3-D
tensors (`mlp.experts.gate_up_proj` (E, hidden, 2 x inter), `down_proj` (E, inter, hidden))
split theirs along the first axis. The router and attention are tallied per layer on their own;
anything else inside a layer (Qwen3-MoE's dense `mlp_only_layers` MLPs) goes to "dense".

  counts = expert_counts(load_mask_indices(mask_dir), config)   # or a bool mask tree
  concentration(counts["per_expert"])                           # share in the top 10% of units
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from harmjax.config import ModelConfig
from harmjax.errors import HarmjaxError
from harmjax.model.moe_specs import ffn_key, router_key
from harmjax.tree import iter_leaves

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class NotMoEError(HarmjaxError, ValueError):
    """Per-expert counts were asked of a model without experts."""


def is_moe(config: ModelConfig) -> bool:
    """Whether the model has mixture-of-experts blocks (a `moe_layout` and experts)."""
    return bool(getattr(config, "moe_layout", None)) and bool(getattr(config, "num_experts", 0))


def _as_indices(mask) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    """(indices, shapes) from either a `load_mask_indices` pair or a bool mask tree (nested or flat)."""
    if isinstance(mask, tuple) and len(mask) == 2:
        indices, shapes = mask
        return {n: np.asarray(v) for n, v in indices.items()}, {n: tuple(s) for n, s in shapes.items()}
    leaves = dict(iter_leaves(mask))
    return ({n: np.flatnonzero(np.asarray(x)) for n, x in leaves.items()},
            {n: tuple(np.shape(x)) for n, x in leaves.items()})


def _kind(rest: str, config: ModelConfig) -> tuple[str, int | None]:
    """("expert", e), ("fused", None), ("router", None), ("attention", None) or ("dense", None)
    for a name relative to its layer."""
    ffn = ffn_key(config)
    if rest.startswith("self_attn."):
        return "attention", None
    if rest.startswith(f"{ffn}.{router_key(config)}."):
        return "router", None
    if rest.startswith(f"{ffn}.experts."):
        part = rest[len(ffn) + len(".experts."):].split(".")[0]
        return ("expert", int(part)) if part.isdigit() else ("fused", None)
    return "dense", None


def expert_counts(mask, config: ModelConfig) -> dict[str, Any]:
    """Pruned weights per layer and expert of a MoE model's mask.

    `mask`: a bool mask tree keyed by HF names, or the (indices, shapes) pair of
    `load_mask_indices`. Returns {"num_experts": E, "per_expert": {layer: [count per expert]},
    "expert_size": {layer: [scored weights per expert]}, and per layer "router", "attention",
    "dense" counts with their "*_size" (scored weights)}, layers as strings in model order.
    Only the mask's leaves (the scored weights) are counted; expert biases are never scored.
    """
    if not is_moe(config):
        raise NotMoEError(f"expert_counts needs a mixture-of-experts model; {config.model_type!r} has no experts.")
    indices, shapes = _as_indices(mask)
    n_exp = config.num_experts
    out: dict[str, Any] = {"num_experts": n_exp, "per_expert": {}, "expert_size": {}}
    for key in ("router", "attention", "dense"):
        out[key], out[f"{key}_size"] = {}, {}
    for name, shape in shapes.items():
        match = _LAYER_RE.match(name)
        if match is None:
            continue  # embeddings and the head are not inside a block
        layer, (kind, expert) = match.group(1), _kind(match.group(2), config)
        idx, size = indices.get(name, np.zeros(0, np.int64)), int(np.prod(shape, dtype=np.int64))
        if kind in ("expert", "fused"):
            counts = out["per_expert"].setdefault(layer, [0] * n_exp)
            sizes = out["expert_size"].setdefault(layer, [0] * n_exp)
            if kind == "expert":
                counts[expert] += int(len(idx))
                sizes[expert] += size
            else:  # the fused 3-D tensor: the expert is the first axis of the row-major flat index
                per = size // shape[0]
                hist = np.bincount(np.asarray(idx, np.int64) // per, minlength=shape[0])
                for e in range(shape[0]):
                    counts[e] += int(hist[e])
                    sizes[e] += per
        else:
            out[kind][layer] = out[kind].get(layer, 0) + int(len(idx))
            out[f"{kind}_size"][layer] = out[f"{kind}_size"].get(layer, 0) + size
    for key in [k for k in out if isinstance(out[k], dict)]:
        out[key] = dict(sorted(out[key].items(), key=lambda kv: int(kv[0])))
    return out


def concentration(per_expert: Mapping[str, Any], top: float = 0.1) -> dict[str, Any]:
    """How concentrated pruned expert weights are: the share of them that falls in the top
    `top` fraction of (layer, expert) units ranked by pruned count (ceil(top x units) units, at
    least one). Returns {"share", "units", "top_units", "pruned"}; share is None when the mask
    prunes no expert weight. Every expert of a model has the same size, so ranking by count is
    ranking by the share of each unit's weights."""
    counts = np.sort(np.concatenate([np.asarray(v, np.int64) for v in per_expert.values()]) if per_expert
                     else np.zeros(0, np.int64))[::-1]
    k = max(1, math.ceil(top * len(counts))) if len(counts) else 0
    total = int(counts.sum())
    return {"share": float(counts[:k].sum() / total) if total else None, "units": int(len(counts)),
            "top_units": k, "pruned": total}
