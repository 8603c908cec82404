"""The report's mixture-of-experts section: where the harm masks fall among the experts, and how
concentrated they are, against the random control of the same q (`harmjax.masks.experts`).

Concentration is the share of a mask's pruned expert weights in the top 10% of (layer, expert)
units. Read it against the random control's: the control keeps the harm mask's count in every
scored matrix, so where a matrix holds one expert (Mixtral and Qwen3-MoE files) the two masks
prune exactly as many weights per expert, and at granularity "matrix" the harm mask's spread
over those experts is set by the selection (floor(q x size) per matrix, less T_p), not by the
scores. Only gpt-oss' fused tensors (all experts of a layer in one matrix) or granularity
"global" let the scores choose the experts; the section says which case a run is.
"""

from __future__ import annotations

from typing import Any

from harmjax.masks.experts import concentration, expert_counts, is_moe
from harmjax.masks.storage import load_mask_indices

TOP = 0.1  # the top fraction of (layer, expert) units the concentration share counts


def expert_placement(config, masks, headline, granularity: str) -> dict[str, Any] | None:
    """For a MoE model (None otherwise): {"top", "layout", "per_expert_matrices",
    "selection_fixes_spread", "headline", "counts" (the headline harm mask's `expert_counts`),
    "rows": per q of the sweep {"q", "harm", "random"} concentration dicts (random None when
    the run has no random control)}."""
    if not is_moe(config):
        return None
    random = {m["q"]: m for m in masks if m["kind"] == "random"}
    rows, counts = [], None
    for m in sorted((m for m in masks if m["kind"] == "harm"), key=lambda m: m["q"]):
        harm = expert_counts(load_mask_indices(m["dir"]), config)
        if headline is not None and m["name"] == headline["name"]:
            counts = harm
        ctrl = random.get(m["q"])
        rows.append({"q": m["q"], "harm": concentration(harm["per_expert"], TOP),
                     "random": (concentration(expert_counts(load_mask_indices(ctrl["dir"]), config)["per_expert"], TOP)
                                if ctrl is not None else None)})
    per_expert_matrices = config.moe_layout != "fused"
    return {"top": TOP, "layout": config.moe_layout, "per_expert_matrices": per_expert_matrices,
            "selection_fixes_spread": per_expert_matrices and granularity != "global",
            "headline": headline["name"] if headline is not None else None, "counts": counts, "rows": rows}


def _share(c) -> str:
    return "n/a" if c is None or c["share"] is None else f"{c['share']:.1%}"


def experts_markdown(experts, plot: str | None) -> str:
    """The report's "Where the harm mask falls among the experts" section ("" for dense models)."""
    if not experts:
        return ""
    out = ["\n## Where the harm mask falls among the experts (MoE)\n"]
    c = experts["counts"]
    if c is not None:
        pruned_exp = sum(sum(v) for v in c["per_expert"].values())
        router, attention, dense = (sum(c[k].values()) for k in ("router", "attention", "dense"))
        out.append(f"Headline mask {experts['headline']}: {pruned_exp:,} pruned weights in experts, {router:,} in "
                   f"routers, {attention:,} in attention" + (f", {dense:,} in dense MLP layers" if dense else "")
                   + ".\n")
    if plot:
        out.append(f"\n![pruned share per layer and expert]({plot})\n")
    first = experts["rows"][0]["harm"] if experts["rows"] else {"units": 0, "top_units": 0}
    even = f"{first['top_units'] / first['units']:.1%}" if first["units"] else "n/a"
    out.append(f"\nConcentration: the share of a mask's pruned expert weights in the top {experts['top']:.0%} of "
               f"(layer, expert) units (the {first['top_units']} of {first['units']} with the most pruned weights), "
               f"against the same-q random control; an even spread gives {even}.\n\n")
    out.append("| q | harm mask | random control | pruned expert weights |\n|---|---|---|---|\n")
    for r in experts["rows"]:
        out.append(f"| {r['q']:g} | {_share(r['harm'])} | {_share(r['random'])} | {r['harm']['pruned']:,} |\n")
    if experts["selection_fixes_spread"]:
        out.append("\nThis checkpoint stores one matrix per expert, and masks are selected per matrix: each expert gets "
                   "floor(q x size) candidates less T_p, and the random control prunes the same count in each expert. "
                   "The spread over experts here reflects T_p(retain) only, not where the harm scores are high; "
                   "granularity \"global\" lets the scores choose the experts.\n")
    return "".join(out)
