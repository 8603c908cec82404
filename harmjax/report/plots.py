"""Plots of the end-to-end report: the harm / utility trade-off of pruning sweeps, and
annotated matrices (Jaccard overlap of category masks, cross-category transfer).

matplotlib is optional (`pip install harmjax[plots]`); it is imported only when a plot is
drawn, and its absence raises `PlotDependencyError`. Every function saves a PNG at `path` and
returns `path`; NaN values (a metric not measured) are drawn as gaps or grey cells, never
as numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from harmjax.masks.plots import pyplot

DEFAULT_LABELS = {
    "fraction": "pruned fraction of scored weights",
    "q": "quantile q",
    "harm_nll": "held-out harmful NLL (nats/token)",
    "benign_nll": "held-out benign NLL (nats/token)",
    "refusal_rate": "refusal rate",
    "strongreject": "StrongREJECT score",
}


def _pyplot():
    return pyplot("harmjax.report.plots")


def _number(value: Any, where: str) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number, got {value!r}.") from None


def _save(plt, fig, path: str, dpi: int, title: str | None = None) -> str:
    """Gives `fig` its overall `title` (if any), lays it out, writes it to `path` and closes it."""
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _series_arrays(
    sweeps: Mapping[str, Sequence[Mapping[str, Any]]], keys: Sequence[str]
) -> dict[str, dict[str, np.ndarray]]:
    """{series: {key: float array sorted by the first key}}, checking every point."""
    if not sweeps:
        raise ValueError("plot_tradeoff: `sweeps` is empty; pass at least one series of points.")
    out = {}
    for name, points in sweeps.items():
        if len(points) == 0:
            raise ValueError(f"plot_tradeoff: series {name!r} has no points.")
        # q rides along for labels; when it is also a plotted key, it is collected once.
        extra_q = "q" not in keys
        columns: dict[str, list[float]] = {k: [] for k in (*keys, "q")}
        for i, point in enumerate(points):
            if not isinstance(point, Mapping):
                raise ValueError(f"plot_tradeoff: series {name!r}, point {i} is a {type(point).__name__}, not a dict.")
            for key in keys:
                if key not in point:
                    raise ValueError(
                        f"plot_tradeoff: series {name!r}, point {i} has no key {key!r} "
                        f"(it has {sorted(point)})."
                    )
                columns[key].append(_number(point[key], f"series {name!r}, point {i}, key {key!r}"))
            if extra_q:
                columns["q"].append(_number(point.get("q"), f"series {name!r}, point {i}, key 'q'"))
        order = np.argsort(np.asarray(columns[keys[0]]), kind="stable")  # NaN x sorts last
        out[name] = {k: np.asarray(v, np.float64)[order] for k, v in columns.items()}
    return out


def plot_tradeoff(
    sweeps: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str,
    *,
    x: str = "fraction",
    harm: str = "harm_nll",
    utility: str = "benign_nll",
    baseline: Mapping[str, Any] | None = None,
    title: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> str:
    """Three panels of pruning sweeps, saved as a PNG at `path` (returns `path`).

    (a) the harm metric against the pruned fraction (log x), (b) the utility metric against it,
    both with the unpruned model as a dashed horizontal line, and (c) harm against utility (the
    trade-off), each point annotated with its quantile q.

    Args:
      sweeps: series name ("harm mask", "random control", ...) -> points, each a mapping with
        at least the keys `x`, `harm` and `utility`; a "q" key, when present, labels the
        point in panel (c). None or NaN values are gaps.
      path: the PNG to write.
      x, harm, utility: the keys of the pruned fraction and of the two metrics.
      baseline: the unpruned model's metrics (keys `harm`, `utility`), or None.
      title: the figure title.
      labels: axis labels by key, overriding `DEFAULT_LABELS` (unknown keys are shown as is).

    Raises:
      ValueError: no series, an empty series, or a point missing one of the keys (names the
        series, the point and the key) or holding a non-number.
    """
    plt = _pyplot()
    series = _series_arrays(sweeps, (x, harm, utility))
    names = {**DEFAULT_LABELS, **(labels or {})}
    base_harm = _number(baseline.get(harm), f"baseline key {harm!r}") if baseline else math.nan
    base_util = _number(baseline.get(utility), f"baseline key {utility!r}") if baseline else math.nan
    # A log axis cannot show x <= 0 (e.g. an unpruned point given as fraction 0): fall back
    # to a linear axis rather than silently dropping points.
    all_x = np.concatenate([s[x] for s in series.values()])
    finite_x = all_x[np.isfinite(all_x)]
    log_x = finite_x.size > 0 and bool(np.all(finite_x > 0))

    fig, axes = plt.subplots(1, 3, figsize=(15.0, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, s) in enumerate(series.items()):
        color = colors[k % len(colors)]
        for ax, key in ((axes[0], harm), (axes[1], utility)):
            ax.plot(s[x], s[key], "-o", color=color, label=name, markersize=4)
        axes[2].plot(s[utility], s[harm], "-o", color=color, label=name, markersize=4)
        for q, u, h in zip(s["q"], s[utility], s[harm]):
            if np.isfinite(q) and np.isfinite(u) and np.isfinite(h):
                axes[2].annotate(f"q={q:g}", (u, h), textcoords="offset points", xytext=(4, 4),
                                 fontsize=7, color=color)
    for ax, key, value in ((axes[0], harm, base_harm), (axes[1], utility, base_util)):
        if np.isfinite(value):
            ax.axhline(value, color="black", linestyle="--", linewidth=1, label="unpruned")
        if log_x:
            ax.set_xscale("log")
            # Minor-tick labels of a short log range overlap; the major decades suffice.
            from matplotlib.ticker import NullFormatter

            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(names.get(x, x))
        ax.set_ylabel(names.get(key, key))
    if np.isfinite(base_harm) and np.isfinite(base_util):
        axes[2].plot([base_util], [base_harm], "*", color="black", markersize=11, label="unpruned")
        # Equal rise of both metrics from the unpruned point: points above it are selective.
        finite_u = np.concatenate([s[utility] for s in series.values()])
        finite_u = finite_u[np.isfinite(finite_u)]
        if finite_u.size:
            top = max(float(finite_u.max()), base_util) - base_util
            axes[2].plot([base_util, base_util + top], [base_harm, base_harm + top], ":", color="grey",
                         linewidth=1, label="equal rise")
    axes[2].set_xlabel(names.get(utility, utility))
    axes[2].set_ylabel(names.get(harm, harm))
    panel_titles = ("(a) harm vs pruned fraction", "(b) utility vs pruned fraction", "(c) harm vs utility")
    for ax, panel_title in zip(axes, panel_titles):
        ax.set_title(panel_title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, path, 110, title)


def plot_matrix(
    matrix: Any,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str,
    *,
    title: str,
    cbar_label: str,
    fmt: str = "{:.2f}",
    cmap: Any = "viridis",
    center: float | None = None,
) -> str:
    """An annotated heatmap (each cell's value written in it), saved as a PNG at `path`.

    For the Jaccard overlap of category masks (symmetric, 1 on the diagonal) and the transfer
    matrix (rows: mask from category A, columns: harm measured on category B). With `center`
    set (e.g. 0.0 for signed changes) the colours are symmetric about it, and the default
    `cmap` ("viridis") is replaced by the diverging "RdBu_r" (any other `cmap` is kept). NaN cells are grey and read "n/a".

    Raises:
      ValueError: `matrix` is not 2-D or is empty, or the label counts differ from its shape.
    """
    plt = _pyplot()
    import matplotlib

    try:
        values = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"plot_matrix: `matrix` is not a numeric array ({e}).") from None
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"plot_matrix: `matrix` must be a non-empty 2-D array, got shape {values.shape}.")
    rows, cols = values.shape
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(
            f"plot_matrix: matrix has shape {values.shape} but there are {len(row_labels)} row labels "
            f"and {len(col_labels)} column labels."
        )
    finite = values[np.isfinite(values)]
    if center is not None:
        if cmap == "viridis":
            cmap = "RdBu_r"
        half = float(np.max(np.abs(finite - center))) if finite.size else 1.0
        half = half or 1.0  # all cells equal to the centre
        norm = matplotlib.colors.Normalize(center - half, center + half)
    else:
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if low == high:
            low, high = low - 0.5, high + 0.5
        norm = matplotlib.colors.Normalize(low, high)
    colormap = matplotlib.colormaps.get_cmap(cmap).with_extremes(bad="lightgrey")

    fig, ax = plt.subplots(figsize=(0.9 * cols + 3.0, 0.6 * rows + 2.0))
    image = ax.imshow(np.ma.masked_invalid(values), cmap=colormap, norm=norm, aspect="auto",
                      interpolation="nearest")
    for i in range(rows):
        for j in range(cols):
            value = values[i, j]
            if np.isfinite(value):
                r, g, b, _ = colormap(norm(value))
                text_color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=8, color=text_color)
            else:
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="dimgrey")
    ax.set_xticks(range(cols), list(col_labels), rotation=45, ha="right")
    ax.set_yticks(range(rows), list(row_labels))
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=cbar_label)
    return _save(plt, fig, path, 110)


def plot_bars(panels: Sequence[Mapping[str, Any]], path: str, *, title: str | None = None) -> str:
    """Side-by-side bar panels with optional error bars, e.g. one panel per EM metric with one
    bar per model. Each panel: {"title", "labels", "values", optional "low"/"high" (interval
    ends), optional "ylabel", optional "ylim"}; NaN/None values are left as gaps."""
    if not panels:
        raise ValueError("plot_bars needs at least one panel.")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        labels = list(panel["labels"])
        values = np.array([np.nan if v is None else float(v) for v in panel["values"]])
        if len(values) != len(labels):
            raise ValueError(f"panel {panel.get('title')!r}: {len(values)} values for {len(labels)} labels.")
        x = np.arange(len(labels))
        ax.bar(x, np.nan_to_num(values), color=[f"C{i}" for i in range(len(labels))], alpha=0.85)
        if panel.get("low") is not None and panel.get("high") is not None:
            low = np.array([np.nan if v is None else float(v) for v in panel["low"]])
            high = np.array([np.nan if v is None else float(v) for v in panel["high"]])
            err = np.vstack([values - low, high - values])
            ok = np.isfinite(err).all(0) & np.isfinite(values)
            ax.errorbar(x[ok], values[ok], yerr=err[:, ok], fmt="none", ecolor="black", capsize=4)
        for xi, v in zip(x, values):
            ax.text(xi, 0 if not math.isfinite(v) else v, "n/a" if not math.isfinite(v) else f"{v:.3g}",
                    ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, labels, rotation=20, ha="right")
        ax.set_title(panel.get("title", ""), fontsize=10)
        if panel.get("ylabel"):
            ax.set_ylabel(panel["ylabel"])
        if panel.get("ylim"):
            ax.set_ylim(*panel["ylim"])
        ax.axhline(0, color="grey", lw=0.6)
    return _save(plt, fig, path, 120, title)


def plot_expert_share(counts: Mapping[str, Any], path: str, *, title: str | None = None) -> str:
    """Where a mask falls in a MoE model: a heatmap of layers x experts, each cell the share of
    that expert's scored weights the mask prunes, and beside it, on the same colour scale, the
    router, attention and (where a layer has one) dense MLP of each layer. `counts` is the
    output of `harmjax.masks.experts.expert_counts`; layers without experts are grey rows."""
    plt = _pyplot()
    import matplotlib

    layers = sorted({*counts["per_expert"], *counts["attention"], *counts["router"], *counts["dense"]}, key=int)
    n_exp = counts["num_experts"]
    experts = np.full((len(layers), n_exp), np.nan)
    side_keys = [k for k in ("router", "attention", "dense") if counts[k]]
    side = np.full((len(layers), len(side_keys)), np.nan)
    for i, layer in enumerate(layers):
        if layer in counts["per_expert"]:
            experts[i] = np.asarray(counts["per_expert"][layer]) / np.maximum(counts["expert_size"][layer], 1)
        for j, key in enumerate(side_keys):
            if layer in counts[key]:
                side[i, j] = counts[key][layer] / max(counts[f"{key}_size"][layer], 1)
    finite = np.concatenate([experts[np.isfinite(experts)], side[np.isfinite(side)]])
    high = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    norm = matplotlib.colors.Normalize(0.0, high)
    cmap = matplotlib.colormaps.get_cmap("viridis").with_extremes(bad="lightgrey")
    fig, (ax, ax_side) = plt.subplots(
        1, 2, figsize=(min(0.16 * n_exp, 16.0) + 4.5, 0.22 * len(layers) + 2.8), layout="constrained",
        gridspec_kw={"width_ratios": [max(n_exp, 2), max(1.5 * len(side_keys), 1.5)]})
    image = ax.imshow(np.ma.masked_invalid(experts), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    step = max(1, n_exp // 16)  # at most ~16 tick labels (128 experts in Qwen3-30B-A3B)
    ax.set_xticks(range(0, n_exp, step))
    ax.set_yticks(range(len(layers)), layers, fontsize=7 if len(layers) > 24 else 9)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("experts (gate, up, down)", fontsize=9)
    ax_side.imshow(np.ma.masked_invalid(side), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax_side.set_xticks(range(len(side_keys)), ["dense MLP" if k == "dense" else k for k in side_keys],
                       rotation=45, ha="right")
    ax_side.set_yticks([])
    fig.colorbar(image, ax=[ax, ax_side], label="share of the unit's weights pruned")
    fig.suptitle(title or "pruned weights per layer and expert", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
