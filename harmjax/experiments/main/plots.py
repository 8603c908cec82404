"""The main experiment's plots (through the shared helpers of `harmjax.report.plots` and
`harmjax.masks.plots`): harm vs utility over q, pruned weights per layer, overlap and transfer."""

from __future__ import annotations

import os


def draw_plots(run_dir, sweep, random, base, headline, overlap, transfer, baseline=(), experts=None) -> dict[str, str]:
    """Draws the plots into `run_dir`; returns {plot key: file name} ("error" when matplotlib is missing).
    `experts` (`main.experts.expert_placement`, MoE models only) adds the per-expert heatmap."""
    from harmjax.masks.plots import PlotDependencyError, plot_mask_counts
    from harmjax.masks.storage import read_summary

    try:
        from harmjax.report.plots import plot_expert_share, plot_matrix, plot_tradeoff
    except ImportError:  # pragma: no cover - the module ships with harmjax
        return {}
    out = {}
    try:
        series = {"harm mask": sweep, **({"random control": random} if random else {})}  # random_control=False: none
        if baseline:  # the benign \ retain baselines of claim 2, every searched q
            series["benign \\ retain"] = list(baseline)
        out["tradeoff"] = plot_tradeoff(
            series, os.path.join(run_dir, "harm_vs_utility.png"),
            baseline={"harm_nll": base["harm_nll"], "benign_nll": base.get("benign_nll")},
            title="held-out harmful vs benign NLL over q (p fixed)")
        if headline is not None:
            out["layers"] = plot_mask_counts(read_summary(headline["dir"])["counts"],
                                             os.path.join(run_dir, "mask_layers.png"),
                                             title=f"pruned weights per layer and projection ({headline['name']})")
        if experts is not None and experts["counts"] is not None:
            out["experts"] = plot_expert_share(experts["counts"], os.path.join(run_dir, "mask_experts.png"),
                                               title=f"share of each unit's weights pruned ({experts['headline']})")
        if overlap["labels"]:
            out["overlap"] = plot_matrix(overlap["matrix"], overlap["labels"], overlap["labels"],
                                         os.path.join(run_dir, "overlap.png"), title="Jaccard overlap of masks",
                                         cbar_label="Jaccard", fmt="{:.2f}")
        if transfer["rows"]:
            out["transfer"] = plot_matrix(transfer["delta_harm_nll"], transfer["rows"], transfer["cols"],
                                          os.path.join(run_dir, "transfer.png"),
                                          title="harm NLL rise on category B (columns) with A's mask (rows)",
                                          cbar_label="Δ harmful NLL (nats/token)", fmt="{:+.2f}", center=0.0)
    except PlotDependencyError as e:
        out["error"] = str(e)
    return {k: os.path.basename(v) if k != "error" else v for k, v in out.items()}
