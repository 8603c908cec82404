"""The report's mixture-of-experts section: where the harm masks fall among the experts, and how
concentrated they are, against the random control of the same q (`harmjax.masks.experts`).

Concentration is the share of a mask's pruned expert weights in the top 10% of (layer, expert)
units. Read it against the random control's, which prunes as many weights in each selection
unit at random. At granularity "matrix" a layer's experts of one kind are one unit in either
checkpoint layout (gpt-oss' fused tensor, or Mixtral's and Qwen3-MoE's per-expert leaves ranked
together, `harmjax.masks.groups`), so the scores choose the experts and the control spreads its
count over them at random. Only granularity "row" fixes each expert's count (floor(q x columns)
per row); the section says so when a run uses it.
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
    return {"top": TOP, "layout": config.moe_layout, "per_expert_matrices": config.moe_layout != "fused",
            "selection_fixes_spread": granularity == "row",
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
        out.append("\nMasks here are selected per output row (granularity \"row\"): each expert gets floor(q x columns) "
                   "weights per row less T_p, and the random control prunes the same count in each matrix. The spread "
                   "over experts reflects T_p(retain) only, not where the harm scores are high; granularity \"matrix\" "
                   "or \"global\" lets the scores choose the experts.\n")
    return "".join(out)
