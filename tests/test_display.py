"""Rich display of masks, score trees and mask comparisons (issue 27): the numbers of the
HTML table (`_repr_html_`, what a notebook shows) and of the text table (`print`) against
counts computed independently with NumPy on the same arrays."""

from html.parser import HTMLParser

import jax.numpy as jnp
import numpy as np
import pytest

from harmjax.masks import compare, summary

LAYERS = 3
SHAPES = {"self_attn.q_proj": (8, 6), "self_attn.k_proj": (4, 6), "mlp.down_proj": (6, 10)}


def _tree(make):
    """A params-shaped tree: 3 decoder blocks of 3 projections and an lm_head; leaves from make(shape)."""
    layers = {}
    for i in range(LAYERS):
        block = {}
        for dotted, shape in SHAPES.items():
            module, proj = dotted.split(".")
            block.setdefault(module, {})[proj] = {"weight": make(shape)}
        layers[str(i)] = block
    return {"model": {"layers": layers}, "lm_head": {"weight": make((12, 6))}}


def _cells(tree, layer, proj):
    """The leaf of (layer, projection) as NumPy, or None when the model has no such matrix."""
    if layer == "lm_head":
        return np.asarray(tree["lm_head"]["weight"]) if proj == "lm_head" else None
    for dotted in SHAPES:
        module, name = dotted.split(".")
        if name == proj:
            return np.asarray(tree["model"]["layers"][layer][module][name]["weight"])
    return None


class _Table(HTMLParser):
    """The rows of the first HTML table, each a list of its cells' text."""

    def __init__(self, text):
        super().__init__()
        self.rows, self._cell = [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(self._cell)
            self._cell = None


def _grid(obj):
    """{(layer, projection): cell text} from the object's HTML table, and the same from its
    print() text, each checked to name the same layers and projections."""
    rows = _Table(obj._repr_html_()).rows
    header, body = rows[0], rows[1:]
    html = {(r[0], p): c for r in body for p, c in zip(header[1:], r[1:])}
    text_lines = str(obj).splitlines()[1:-1]  # title first, footer last
    projections = text_lines[0].split()[1:]
    assert projections == header[1:]
    text = {}
    for line in text_lines[1:]:
        layer, rest = line.split(maxsplit=1)
        # Cells are right-aligned under their header: split at the header's column ends.
        ends = [text_lines[0].index(p) + len(p) for p in projections]
        offset = len(line) - len(line.lstrip()) + len(layer)
        starts = [offset] + ends[:-1]
        text.update({(layer, p): line[s:e].strip() for p, s, e in zip(projections, starts, ends)})
    assert set(text) == set(html)
    return html, text


def test_mask_summary_counts_and_shares_match_numpy():
    rng = np.random.default_rng(0)
    mask = _tree(lambda s: jnp.asarray(rng.random(s) < 0.15))
    params = _tree(lambda s: np.zeros(s, np.float32))
    s = summary(mask, params)
    html, text = _grid(s)
    expected_layers = [str(i) for i in range(LAYERS)] + ["lm_head"]
    assert s.layers == expected_layers and s.projections == ["q_proj", "k_proj", "down_proj", "lm_head"]
    total = 0
    for layer in s.layers:
        for proj in s.projections:
            leaf = _cells(mask, layer, proj)
            if leaf is None:
                want = "."
            else:
                n = int(leaf.sum())
                total += n
                want = f"{n:,} ({100 * n / leaf.size:.2g}%)" if n else "."
            assert html[(layer, proj)] == want == text[(layer, proj)], (layer, proj)
    scored = sum(np.asarray(x).size for x in _flat(mask))
    assert s.total == total and s.scored == scored and s.num_params == scored
    assert str(s).splitlines()[-1].startswith(f"pruned {total:,} of {scored:,} scored weights")


def _flat(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _flat(v)
    else:
        yield tree


def test_score_summary_means_match_numpy():
    rng = np.random.default_rng(1)
    scores = _tree(lambda s: jnp.asarray(rng.normal(size=s).astype(np.float32)))
    s = summary(scores)
    html, text = _grid(s)
    for (layer, proj), cell in html.items():
        leaf = _cells(scores, layer, proj)
        want = "." if leaf is None else f"{leaf.astype(np.float64).mean():.3g}"
        assert cell == want == text[(layer, proj)], (layer, proj)
    every = np.concatenate([np.asarray(x).ravel() for x in _flat(scores)])
    assert s.entries == every.size and s.positive == int((every > 0).sum())
    assert s.min == pytest.approx(every.min()) and s.max == pytest.approx(every.max())


def test_mask_comparison_matches_numpy_set_counts():
    rng = np.random.default_rng(2)
    a = _tree(lambda s: jnp.asarray(rng.random(s) < 0.2))
    b = _tree(lambda s: jnp.asarray(rng.random(s) < 0.2))
    c = compare(a, b, names=("cyber", "bio"))
    html, text = _grid(c)
    for (layer, proj), cell in html.items():
        x, y = _cells(a, layer, proj), _cells(b, layer, proj)
        want = "." if x is None else f"{int((x & y).sum()):,} / {int((x & ~y).sum()):,} / {int((~x & y).sum()):,}"
        assert cell == want == text[(layer, proj)], (layer, proj)
    fa, fb = (np.concatenate([np.asarray(v).ravel() for v in _flat(t)]) for t in (a, b))
    assert c.jaccard == pytest.approx((fa & fb).sum() / (fa | fb).sum())
    assert str(c).splitlines()[0] == "cyber vs bio: both / only cyber / only bio"


def test_html_escapes_names():
    """A title from user input cannot inject markup into the notebook."""
    mask = _tree(lambda s: jnp.zeros(s, bool))
    assert "<script>" not in summary(mask, title="<script>x</script>")._repr_html_()
