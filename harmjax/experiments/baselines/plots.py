"""The comparison's plot: one panel per measure, each intervention's change from the
unmodified model side by side (one bar per model), 95% bootstrap intervals as error bars."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from harmjax import distributed
from harmjax.experiments.baselines.measures import INTERVENTIONS, LABELS, MEASURES
from harmjax.masks.plots import pyplot


def _finite(x) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else 0.0


def plot_changes(path: str, summaries: Mapping[str, Mapping]) -> None:
    """Draws the changes of every model's summary (`report.model_summary`) into `path`."""
    if not distributed.is_writer():
        return
    plt = pyplot("harmjax.experiments.baselines")
    names = list(INTERVENTIONS[1:])
    labels = list(summaries)
    width = 0.8 / max(1, len(labels))
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(3.4 * len(MEASURES), 3.4))
    for ax, key in zip(axes, MEASURES):
        for j, label in enumerate(labels):
            s = summaries[label]
            vals = np.array([_finite(s["deltas"][n][key]) for n in names])
            lo = np.array([_finite(s["ci"][n][key][0]) if s["ci"][n][key][0] is not None else v
                           for n, v in zip(names, vals)])
            hi = np.array([_finite(s["ci"][n][key][1]) if s["ci"][n][key][1] is not None else v
                           for n, v in zip(names, vals)])
            err = np.vstack([np.maximum(vals - lo, 0), np.maximum(hi - vals, 0)])
            ax.bar(np.arange(len(names)) + (j - (len(labels) - 1) / 2) * width, vals, width, yerr=err,
                   capsize=2, label=label)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"Δ {LABELS[key]}", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
