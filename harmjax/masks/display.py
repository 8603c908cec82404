"""Compact summaries of masks, score trees and mask comparisons for notebooks and print.

A mask or score tree is a plain nested dict, so a notebook cell ending in one shows pages of
arrays. Wrap it instead: the last line of a cell

  harmjax.masks.summary(mask, model.params)     # pruned count and share per layer x projection
  harmjax.masks.summary(harm_scores)            # mean score per layer x projection
  harmjax.masks.compare(mask_cyber, mask_bio, names=("cyber", "bio"))

renders as a small HTML table whose cells are shaded by value (`_repr_html_`, which Jupyter,
VS Code and Colab call), and `print(...)` of the same object gives an aligned text table.
Nothing here needs more than NumPy and JAX; the numbers are computed once, on construction.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harmjax.distributed import to_host
from harmjax.masks.algebra import (
    counts_summary,
    difference,
    hf_sorted_leaves,
    intersection,
    jaccard,
    mask_counts,
)
from harmjax.masks.plots import counts_grid

Tree = Mapping[str, Any]


def _grid_of(summary: Mapping[str, Any], layers: Sequence[str], projections: Sequence[str]) -> np.ndarray:
    """A (layers x projections) array from a `counts_summary`-shaped dict, 0 where absent."""
    table = summary["per_layer_projection"]
    return np.array([[table.get(layer, {}).get(p, 0) for p in projections] for layer in layers], dtype=np.float64)


def _shapes_summary(tree: Tree) -> dict[str, Any]:
    # counts_summary adds whatever number it is given per matrix; given each matrix's size it
    # yields the number of weights per layer x projection (the denominators of the shares).
    return counts_summary([(name, tuple(np.shape(leaf)), int(np.prod(np.shape(leaf), dtype=np.int64)))
                           for name, leaf in hf_sorted_leaves(tree)])


def _text_table(corner: str, layers: Sequence[str], projections: Sequence[str], cells: list[list[str]]) -> list[str]:
    rows = [[corner, *projections], *([layer, *row] for layer, row in zip(layers, cells))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]


def _html_table(title: str, corner: str, layers: Sequence[str], projections: Sequence[str],
                cells: list[list[str]], shade: np.ndarray, footer: str) -> str:
    """An HTML table, each cell's background as dark as its `shade` value in [0, 1]."""
    head = "".join(f"<th>{html.escape(p)}</th>" for p in projections)
    body = []
    for layer, row, shades in zip(layers, cells, shade):
        tds = "".join(
            f'<td style="background: rgba(230, 120, 0, {0.7 * float(s):.3f}); text-align: right">{html.escape(c)}</td>'
            for c, s in zip(row, shades)
        )
        body.append(f"<tr><th>{html.escape(layer)}</th>{tds}</tr>")
    return (f'<div><b>{html.escape(title)}</b><table style="font-size: 0.85em; border-collapse: collapse">'
            f"<tr><th>{html.escape(corner)}</th>{head}</tr>{''.join(body)}</table>"
            f"<div>{html.escape(footer)}</div></div>")


def _normalized(x: np.ndarray) -> np.ndarray:
    top = np.abs(x).max() if x.size else 0.0
    return np.abs(x) / top if top > 0 else np.zeros_like(x)


class MaskSummary:
    """Pruned weights of one mask per layer (rows) and projection (columns): `counts[i, j]`
    pruned of `sizes[i, j]` weights, `shares = counts / sizes`; `total`, `scored` and, when
    the params were given, `num_params`."""

    def __init__(self, mask: Tree, params: Tree | None = None, title: str = "mask"):
        self.title = title
        self.raw = mask_counts(mask, params)  # the dict save_mask writes as summary.json's counts
        self.layers, self.projections, grid = counts_grid(self.raw)
        self.counts = grid.astype(np.int64)
        self.sizes = _grid_of(_shapes_summary(mask), self.layers, self.projections).astype(np.int64)
        self.shares = np.divide(self.counts, self.sizes, out=np.zeros(self.counts.shape), where=self.sizes > 0)
        self.total, self.scored, self.num_params = self.raw["total"], self.raw["scored"], self.raw["num_params"]

    def cells(self) -> list[list[str]]:
        """The table's cells as text: "count (share%)", or "." for an empty cell."""
        return [[f"{c:,} ({100 * s:.2g}%)" if c else "." for c, s in zip(crow, srow)]
                for crow, srow in zip(self.counts, self.shares)]

    def footer(self) -> str:
        """One line: pruned of scored weights, and of all parameters when known."""
        text = f"pruned {self.total:,} of {self.scored:,} scored weights ({100 * self.total / max(self.scored, 1):.3g}%)"
        if self.num_params:
            text += f", {100 * self.total / self.num_params:.3g}% of all {self.num_params:,} parameters"
        return text

    def __repr__(self) -> str:
        return "\n".join([self.title, *_text_table("layer", self.layers, self.projections, self.cells()), self.footer()])

    def _repr_html_(self) -> str:
        return _html_table(self.title, "layer", self.layers, self.projections, self.cells(), _normalized(self.shares), self.footer())


@jax.jit
def _leaf_stats(leaves: list[Any]) -> tuple[jax.Array, jax.Array]:
    # One program for every leaf: float32 sum, min, max, and the count of positive entries.
    floats = jnp.stack([jnp.stack([jnp.sum(x, dtype=jnp.float32), jnp.min(x).astype(jnp.float32),
                                   jnp.max(x).astype(jnp.float32)]) for x in leaves])
    positive = jnp.stack([jnp.sum(x > 0, dtype=jnp.int32) for x in leaves])
    return floats, positive


class ScoreSummary:
    """A score tree per layer (rows) and projection (columns): `means[i, j]` is the mean
    score of that projection's weights, `sums` their sum; `min`, `max`, `positive` (entries
    above 0) and `entries` over the whole tree."""

    def __init__(self, scores: Tree, title: str = "scores"):
        self.title = title
        items = hf_sorted_leaves(scores)
        floats, positive = _leaf_stats([leaf for _, leaf in items])
        floats, positive = to_host(floats).astype(np.float64), to_host(positive).astype(np.int64)
        sums = counts_summary([(name, tuple(np.shape(leaf)), float(s)) for (name, leaf), s in zip(items, floats[:, 0])])
        sizes = _shapes_summary(scores)
        self.layers = list(sizes["per_layer_projection"])
        self.projections = list(sizes["per_projection"])
        self.sums = _grid_of(sums, self.layers, self.projections)
        self.sizes = _grid_of(sizes, self.layers, self.projections).astype(np.int64)
        self.means = np.divide(self.sums, self.sizes, out=np.zeros(self.sums.shape), where=self.sizes > 0)
        self.entries = int(sizes["total"])
        self.min, self.max = float(floats[:, 1].min()), float(floats[:, 2].max())
        self.positive = int(positive.sum())

    def cells(self) -> list[list[str]]:
        """The table's cells as text: the mean score, "." where a layer has no such matrix."""
        return [[f"{m:.3g}" if n else "." for m, n in zip(mrow, nrow)] for mrow, nrow in zip(self.means, self.sizes)]

    def footer(self) -> str:
        """One line: entries, range, share above 0 and the total."""
        return (f"mean per layer x projection; {self.entries:,} entries in [{self.min:.3g}, {self.max:.3g}], "
                f"{100 * self.positive / max(self.entries, 1):.3g}% above 0, sum {self.sums.sum():.4g}")

    def __repr__(self) -> str:
        return "\n".join([self.title, *_text_table("layer", self.layers, self.projections, self.cells()), self.footer()])

    def _repr_html_(self) -> str:
        return _html_table(self.title, "layer", self.layers, self.projections, self.cells(), _normalized(self.means), self.footer())


class MaskComparison:
    """Two masks of one structure per layer and projection: `both[i, j]` weights pruned by
    both, `only_a[i, j]` and `only_b[i, j]` by one of them, of `sizes[i, j]`; `jaccard` over
    the whole tree."""

    def __init__(self, a: Tree, b: Tree, names: tuple[str, str] = ("a", "b")):
        self.names = tuple(names)
        parts = [mask_counts(m) for m in (intersection(a, b), difference(a, b), difference(b, a))]
        self.layers, self.projections, _ = counts_grid(mask_counts(a))
        self.both, self.only_a, self.only_b = (_grid_of(p, self.layers, self.projections).astype(np.int64) for p in parts)
        self.sizes = _grid_of(_shapes_summary(a), self.layers, self.projections).astype(np.int64)
        self.jaccard = jaccard(a, b)

    def cells(self) -> list[list[str]]:
        """The table's cells as text: "both / only a / only b", "." where a layer has no such matrix."""
        return [[f"{x:,} / {y:,} / {z:,}" if n else "." for x, y, z, n in zip(*rows)]
                for rows in zip(self.both, self.only_a, self.only_b, self.sizes)]

    def footer(self) -> str:
        """One line: the totals and the Jaccard index."""
        a, b = self.names
        return (f"both {self.both.sum():,}, only {a} {self.only_a.sum():,}, only {b} {self.only_b.sum():,}; "
                f"Jaccard {self.jaccard:.3g}")

    def _title(self) -> str:
        a, b = self.names
        return f"{a} vs {b}: both / only {a} / only {b}"

    def __repr__(self) -> str:
        return "\n".join([self._title(), *_text_table("layer", self.layers, self.projections, self.cells()), self.footer()])

    def _repr_html_(self) -> str:
        union = self.both + self.only_a + self.only_b
        overlap = np.divide(self.both, union, out=np.zeros(union.shape), where=union > 0)
        return _html_table(self._title(), "layer", self.layers, self.projections, self.cells(), overlap, self.footer())


def summary(tree: Tree, params: Tree | None = None, title: str | None = None) -> MaskSummary | ScoreSummary:
    """A notebook- and print-friendly summary of a mask (bool leaves: `MaskSummary`, with
    shares of all parameters when `params` is given) or of a score tree (`ScoreSummary`)."""
    leaves = [leaf for _, leaf in hf_sorted_leaves(tree)]
    if leaves and all(np.dtype(leaf.dtype) == np.bool_ for leaf in leaves):
        return MaskSummary(tree, params, title or "mask")
    return ScoreSummary(tree, title or "scores")


def compare(a: Tree, b: Tree, names: tuple[str, str] = ("a", "b")) -> MaskComparison:
    """A notebook- and print-friendly comparison of two masks (`MaskComparison`)."""
    return MaskComparison(a, b, names)


__all__ = ["MaskComparison", "MaskSummary", "ScoreSummary", "compare", "summary"]
