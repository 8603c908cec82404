"""Claim 3's plot: both models' harm and benign curves over the pruned fraction."""

from __future__ import annotations

import math
import os

from harmjax.experiments.compression.measures import within


def plot_compression(out_dir, models, result) -> str | None:
    """Draws compression.png into `out_dir`; returns its file name (None without matplotlib)."""
    from harmjax.masks.plots import PlotDependencyError, pyplot

    try:
        plt = pyplot("harmjax.experiments.compression")
    except PlotDependencyError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    budget, target = result["benign_budget"], result["harm_target"]
    for (key, m), color, fig_key in zip(models.items(), ("tab:blue", "tab:red"), ("a", "b")):
        c = m["curve"]
        if not c:
            continue
        x = [p["fraction"] for p in c]
        label = f"{'A' if key == 'model_a' else 'B'}: {m['label']}"
        axes[0].plot(x, [p["d_harm"] for p in c], "-", color=color, label=label)
        ok = [within(p["d_benign"], budget) for p in c]
        for xi, yi, good in zip(x, [p["d_harm"] for p in c], ok):  # filled: within the benign budget
            axes[0].plot([xi], [yi], "o", color=color, mfc=color if good else "white")
        axes[1].plot(x, [p["d_benign"] if p["d_benign"] is not None else math.nan for p in c], "o-", color=color,
                     label=label)
        f = result[fig_key]
        if f["reached"]:
            axes[0].axvline(f["fraction"], color=color, ls=":", lw=1)
    axes[0].axhline(target, color="grey", ls="--", lw=1, label=f"harm target {target:g}")
    axes[1].axhline(budget, color="grey", ls="--", lw=1, label=f"benign budget {budget:g}")
    for ax, ylabel in zip(axes, ("Δ held-out harmful NLL (nats/token)", "Δ held-out benign NLL (nats/token)")):
        ax.set_xscale("log")
        ax.set_xlabel("pruned fraction of scored weights")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("harm rise (filled: benign rise within budget)", fontsize=10)
    axes[1].set_title("utility cost", fontsize=10)
    fig.suptitle(f"compression: {result['verdict']}", fontsize=11)
    fig.tight_layout()
    path = os.path.join(out_dir, "compression.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.path.basename(path)
