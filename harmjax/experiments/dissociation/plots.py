"""Dissociation's plot: per behaviour, each mask's change from the unmasked model."""

from __future__ import annotations

import math
from collections.abc import Mapping

from harmjax import distributed
from harmjax.experiments.dissociation.measures import MASKS
from harmjax.masks.plots import pyplot


def plot_deltas(path: str, d: Mapping[str, Mapping[str, float]]) -> None:
    """Draws each mask's behaviour changes into `path` (process 0 only)."""
    if not distributed.is_writer():
        return
    plt = pyplot("harmjax.experiments.dissociation")

    panels = [("d_harm_nll", "harmful NLL change (nats)"), ("d_attack_harmful_rate", "attack non-refusal change"),
              ("d_refusal_rate", "refusal-rate change"), ("d_auroc", "recognition AUROC change"),
              ("d_explanation_nll", "explanation NLL change (nats)")]
    names = [m for m in MASKS[1:] if m in d]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    colors = {"harm": "tab:red", "refusal": "tab:blue", "random_harm": "lightcoral", "random_refusal": "lightblue"}
    for ax, (k, title) in zip(axes, panels):
        vals = [d[m][k] for m in names]
        ax.bar(range(len(names)), [x if math.isfinite(x) else 0.0 for x in vals], color=[colors[m] for m in names])
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
