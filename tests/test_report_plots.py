"""Report plots: valid PNGs of the expected shape, NaN and 1-point series, clear input errors."""

import math

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402

from harmjax.report.plots import plot_matrix, plot_tradeoff  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image


def sweep(fractions, harm, utility, qs):
    return [{"fraction": f, "harm_nll": h, "benign_nll": u, "q": q} for f, h, u, q in zip(fractions, harm, utility, qs)]


def test_tradeoff_is_a_wide_three_panel_png(tmp_path):
    sweeps = {
        "harm mask": sweep([1e-4, 1e-3, 1e-2], [2.0, 3.5, 6.0], [1.1, 1.15, 1.6], [0.9999, 0.999, 0.99]),
        "random control": sweep([1e-4, 1e-3, 1e-2], [2.0, 2.05, 2.3], [1.1, 1.12, 1.4], [0.9999, 0.999, 0.99]),
    }
    path = str(tmp_path / "tradeoff.png")
    assert plot_tradeoff(sweeps, path, baseline={"harm_nll": 2.0, "benign_nll": 1.1}, title="sweep",
                         labels={"harm_nll": "harmful NLL"}) == path
    height, width, _ = read_png(path).shape
    assert width > 2.5 * height  # three panels side by side
    # The drawing is not blank: many distinct colours (lines, markers, text).
    assert len(np.unique(read_png(path).reshape(-1, read_png(path).shape[2]), axis=0)) > 50


def test_tradeoff_handles_nan_one_point_series_and_zero_fraction(tmp_path):
    sweeps = {
        "one point": [{"fraction": 0.01, "harm_nll": 4.0, "benign_nll": 1.2, "q": 0.99}],
        "with gaps": sweep([1e-3, 1e-2, 1e-1], [float("nan"), 3.0, None], [1.0, math.nan, 2.0], [0.9, None, 0.5]),
        "all nan": [{"fraction": math.nan, "harm_nll": math.nan, "benign_nll": math.nan}],
    }
    path = str(tmp_path / "nan.png")
    read_png(plot_tradeoff(sweeps, path, baseline={"harm_nll": math.nan, "benign_nll": 1.0}))
    # A fraction of 0 (the unpruned point) cannot go on a log axis: drawn on a linear one instead.
    path0 = str(tmp_path / "zero.png")
    read_png(plot_tradeoff({"s": sweep([0.0, 0.01], [2.0, 5.0], [1.0, 1.3], [1.0, 0.99])}, path0))


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib figures saved during the test (the plot functions close them, but a
    closed figure keeps its artists, so the plotted data can be read back)."""
    import matplotlib.figure

    figures, real_savefig = [], matplotlib.figure.Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return figures


def test_tradeoff_over_q(tmp_path, saved_figures):
    """x="q" (one of the documented axes) plots q itself, not a doubled q column."""
    points = sweep([1e-4, 1e-3], [2.0, 3.5], [1.1, 1.15], [0.9999, 0.999])
    path = str(tmp_path / "q.png")
    read_png(plot_tradeoff({"harm mask": points}, path, x="q"))
    (fig,) = saved_figures
    a, b, c = fig.axes[:3]
    # The expected series, independently: the points sorted by q, one line per panel.
    by_q = sorted(points, key=lambda p: p["q"])
    q, harm, benign = ([p[k] for p in by_q] for k in ("q", "harm_nll", "benign_nll"))
    for ax, ys in ((a, harm), (b, benign)):
        (line,) = ax.get_lines()  # no baseline given: no dashed line
        np.testing.assert_array_equal(line.get_xdata(), q)
        np.testing.assert_array_equal(line.get_ydata(), ys)
        assert ax.get_xlabel() == "quantile q" and ax.get_xscale() == "log"
    (line,) = c.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), benign)
    np.testing.assert_array_equal(line.get_ydata(), harm)
    # Each point of panel (c) is labelled with its own q.
    labels = sorted((t.get_text(), tuple(t.xy)) for t in c.texts)
    assert labels == sorted((f"q={v:g}", (u, h)) for v, u, h in zip(q, benign, harm))


def test_tradeoff_errors_name_series_and_key(tmp_path):
    path = str(tmp_path / "x.png")
    bad = {"harm mask": sweep([0.01], [3.0], [1.0], [0.99]), "random control": [{"fraction": 0.01, "harm_nll": 3.0}]}
    with pytest.raises(ValueError, match=r"series 'random control', point 0 has no key 'benign_nll'"):
        plot_tradeoff(bad, path)
    with pytest.raises(ValueError, match=r"series 's', point 0 has no key 'frac'"):
        plot_tradeoff({"s": sweep([0.01], [3.0], [1.0], [0.99])}, path, x="frac")
    with pytest.raises(ValueError, match=r"series 's', point 0, key 'harm_nll': expected a number"):
        plot_tradeoff({"s": [{"fraction": 0.1, "harm_nll": "high", "benign_nll": 1.0}]}, path)
    with pytest.raises(ValueError, match="series 'empty' has no points"):
        plot_tradeoff({"empty": []}, path)
    with pytest.raises(ValueError, match="`sweeps` is empty"):
        plot_tradeoff({}, path)


def test_matrix_png_follows_the_matrix_shape(tmp_path):
    cats = ["crime", "hate", "malware"]
    jaccard = np.array([[1.0, 0.4, 0.2], [0.4, 1.0, 0.3], [0.2, 0.3, 1.0]])
    path = str(tmp_path / "jaccard.png")
    assert plot_matrix(jaccard, cats, cats, path, title="Jaccard", cbar_label="overlap") == path
    read_png(path)
    wide = str(tmp_path / "wide.png")
    tall = str(tmp_path / "tall.png")
    plot_matrix(np.ones((2, 10)), ["a", "b"], [str(i) for i in range(10)], wide, title="w", cbar_label="v")
    plot_matrix(np.ones((10, 2)), [str(i) for i in range(10)], ["a", "b"], tall, title="t", cbar_label="v")
    h_wide, w_wide, _ = read_png(wide).shape
    h_tall, w_tall, _ = read_png(tall).shape
    assert w_wide > h_wide and h_tall > w_tall


def test_matrix_signed_with_nan_and_center(tmp_path):
    transfer = [[-1.5, 0.2, math.nan], [0.0, math.nan, 3.0]]
    path = str(tmp_path / "transfer.png")
    image = read_png(plot_matrix(transfer, ["A", "B"], ["x", "y", "z"], path, title="transfer",
                                 cbar_label="change in harm NLL", fmt="{:+.1f}", center=0.0))
    # The diverging map shows both a reddish (positive) and a bluish (negative) cell.
    rgb = image[..., :3]
    assert np.any((rgb[..., 0] > 0.6) & (rgb[..., 2] < 0.4))
    assert np.any((rgb[..., 2] > 0.6) & (rgb[..., 0] < 0.4))
    all_nan = str(tmp_path / "all_nan.png")
    read_png(plot_matrix([[math.nan]], ["A"], ["B"], all_nan, title="t", cbar_label="v"))
    constant = str(tmp_path / "constant.png")
    read_png(plot_matrix([[0.0, 0.0]], ["A"], ["B", "C"], constant, title="t", cbar_label="v", center=0.0))


def test_matrix_shape_errors(tmp_path):
    path = str(tmp_path / "m.png")
    with pytest.raises(ValueError, match=r"shape \(2, 3\) but there are 2 row labels and 2 column labels"):
        plot_matrix(np.zeros((2, 3)), ["a", "b"], ["x", "y"], path, title="t", cbar_label="v")
    with pytest.raises(ValueError, match=r"shape \(3, 3\) but there are 2 row labels"):
        plot_matrix(np.zeros((3, 3)), ["a", "b"], ["x", "y", "z"], path, title="t", cbar_label="v")
    with pytest.raises(ValueError, match="must be a non-empty 2-D array, got shape \\(3,\\)"):
        plot_matrix([1.0, 2.0, 3.0], ["a"], ["x", "y", "z"], path, title="t", cbar_label="v")
