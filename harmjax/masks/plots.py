"""A picture of where a mask prunes: pruned-weight counts per layer x projection.

matplotlib is optional (`pip install harmjax[plots]`); it is imported only when a plot is
drawn.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from harmjax.errors import HarmjaxError
from harmjax.masks.algebra import mask_counts


class PlotDependencyError(HarmjaxError, ImportError):
    """matplotlib, needed for plots, is not installed."""


def counts_grid(mask_or_counts: Mapping[str, Any]) -> tuple[list[str], list[str], np.ndarray]:
    """(layers, projections, grid) with grid[i, j] = pruned weights of projection j in layer
    i, from a mask tree or from the output of `mask_counts` (e.g. a summary's "counts")."""
    counts = mask_or_counts if "per_layer_projection" in mask_or_counts else mask_counts(mask_or_counts)
    layers = list(counts["per_layer_projection"])
    projections = list(counts["per_projection"])
    grid = np.zeros((len(layers), len(projections)), np.int64)
    for i, layer in enumerate(layers):
        for j, projection in enumerate(projections):
            grid[i, j] = counts["per_layer_projection"][layer].get(projection, 0)
    return layers, projections, grid


def pyplot(what: str):
    """matplotlib.pyplot on the file-only Agg backend, or PlotDependencyError naming `what`."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotDependencyError(
            f"{what} needs matplotlib, which is not installed: "
            "pip install 'harmjax[plots]' (or pip install matplotlib)."
        ) from e
    return plt


def plot_mask_counts(mask_or_counts: Mapping[str, Any], path: str, title: str | None = None) -> str:
    """Saves a heatmap (rows: layers, columns: projections, cells: pruned weights) as a PNG
    at `path` and returns `path`. Accepts a mask tree or `mask_counts` output."""
    plt = pyplot("plot_mask_counts")
    layers, projections, grid = counts_grid(mask_or_counts)
    fig, ax = plt.subplots(figsize=(1.1 * len(projections) + 2.5, 0.28 * len(layers) + 1.8))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(projections)), projections, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("projection")
    ax.set_ylabel("layer")
    ax.set_title(title or f"pruned weights per layer and projection\n(total {int(grid.sum())})", fontsize=10)
    fig.colorbar(image, ax=ax, label="pruned weights")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
