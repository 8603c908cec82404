"""Selection equals a plain NumPy implementation of the reference semantics, bit for bit.

The reference below sorts with NumPy's stable argsort on -score (ties by lowest flat index),
per matrix, per row, or over all leaves concatenated in HF parameter order; harmjax selects
with bisection and count reductions instead. Score trees are tie-heavy (small integers, with
-0.0 beside +0.0), continuous, or contain inf/NaN.
"""

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from harmjax.masks import MaskMismatchError, select
from harmjax.sharding import MeshConfig, make_mesh
from harmjax.tree import flatten, unflatten

# A small decoder's seven projections (hidden 8, 2 q heads and 1 kv head of 4, mlp 12).
PROJ_SHAPES = {
    "self_attn.q_proj.weight": (8, 8),
    "self_attn.k_proj.weight": (4, 8),
    "self_attn.v_proj.weight": (4, 8),
    "self_attn.o_proj.weight": (8, 8),
    "mlp.gate_proj.weight": (12, 8),
    "mlp.up_proj.weight": (12, 8),
    "mlp.down_proj.weight": (8, 12),  # 4 distinct shapes keep compilation short
}
NUM_LAYERS = 11  # "10" sorts before "2" as a string: HF order must be numeric
HF_ORDER = [f"model.layers.{i}.{n}" for i in range(NUM_LAYERS) for n in PROJ_SHAPES]


def score_tree(seed, kind):
    """Flat {name: float32 scores}, inserted in a scrambled order (layers reversed, projections
    rotated) so that only an implementation that orders leaves by HF order can match."""
    rng = np.random.default_rng(seed)
    flat = {}
    for layer in reversed(range(NUM_LAYERS)):
        names = list(PROJ_SHAPES)
        names = names[layer % 7:] + names[:layer % 7]
        for n in names:
            shape = PROJ_SHAPES[n]
            if kind == "ties":
                s = rng.integers(-3, 4, shape).astype(np.float32)
                s[rng.random(shape) < 0.2] = -0.0  # -0.0 ties with +0.0
            elif kind == "normal":
                s = rng.standard_normal(shape).astype(np.float32)
            else:  # specials
                s = rng.integers(-2, 3, shape).astype(np.float32)
                r = rng.random(shape)
                s[r < 0.05] = np.inf
                s[(r >= 0.05) & (r < 0.1)] = -np.inf
                s[(r >= 0.1) & (r < 0.15)] = np.nan
                s[(r >= 0.15) & (r < 0.2)] = -0.0
            flat[f"model.layers.{layer}.{n}"] = s
    return flat


def ref_top(scores, k):
    """Top-k of a 1-D array by a stable sort on -score: ties go to the lowest index."""
    order = np.argsort(-scores, kind="stable")
    out = np.zeros(scores.size, bool)
    out[order[:k]] = True
    return out


def ref_ranked(scores, lo, hi):
    """Entries ranked lo+1..hi (0-based order[lo:hi]) by the same sort."""
    order = np.argsort(-scores, kind="stable")
    out = np.zeros(scores.size, bool)
    out[order[lo:hi]] = True
    return out


def reference(harm, retain, q, p, granularity, sign_flip=False, skip_first=False):
    """NumPy reference of T_q(harm) \\ T_p(retain) over flat {name: array} trees."""
    sign = -1.0 if sign_flip else 1.0

    def harm_part(s):
        k = int(np.floor(q * s.size))
        return ref_ranked(sign * s, k, min(2 * k, s.size)) if skip_first else ref_top(sign * s, k)

    def retain_part(s):
        return ref_top(s, int(np.floor(p * s.size)))

    def per_unit(part, tree):
        if granularity == "matrix":
            return {n: part(s.ravel()).reshape(s.shape) for n, s in tree.items()}
        if granularity == "row":
            return {n: np.stack([part(row) for row in s]) for n, s in tree.items()}
        cat = np.concatenate([tree[n].ravel() for n in HF_ORDER])
        sel = part(cat)
        out, start = {}, 0
        for n in HF_ORDER:
            size = tree[n].size
            out[n] = sel[start:start + size].reshape(tree[n].shape)
            start += size
        return out

    mask = per_unit(harm_part, harm)
    if retain is not None:
        spared = per_unit(retain_part, retain)
        mask = {n: mask[n] & ~spared[n] for n in mask}
    return mask


def assert_same(got_tree, want):
    got = flatten(got_tree)
    assert sorted(got) == sorted(want)
    for n in want:
        g = np.asarray(got[n])
        assert g.dtype == np.bool_
        np.testing.assert_array_equal(g, want[n], err_msg=n)


@pytest.mark.parametrize("granularity", ["matrix", "row", "global"])
@pytest.mark.parametrize("kind", ["ties", "normal", "specials"])
def test_matches_numpy_reference(granularity, kind):
    harm, retain = score_tree(1, kind), score_tree(2, kind)
    for q, p in [(0.1, 0.0), (0.3, 0.2), (0.26, 0.51), (0.5, 0.05)]:
        got = select(unflatten(harm), unflatten(retain), q=q, p=p, granularity=granularity, progress=False)
        assert_same(got, reference(harm, retain, q, p, granularity))
    got = select(unflatten(harm), None, q=0.2, granularity=granularity, progress=False)
    assert_same(got, reference(harm, None, 0.2, 0.0, granularity))


@pytest.mark.parametrize("granularity", ["matrix", "row", "global"])
def test_sign_flip_and_skip_first(granularity):
    harm, retain = score_tree(3, "ties"), score_tree(4, "normal")
    for sign_flip, skip_first in [(True, False), (False, True), (True, True)]:
        got = select(unflatten(harm), unflatten(retain), q=0.2, p=0.1, granularity=granularity,
                     sign_flip=sign_flip, skip_first=skip_first, progress=False)
        want = reference(harm, retain, 0.2, 0.1, granularity, sign_flip, skip_first)
        assert_same(got, want)
    # skip_first takes exactly the next slice: disjoint from the top k, same size
    top = flatten(select(unflatten(harm), q=0.2, granularity=granularity, progress=False))
    nxt = flatten(select(unflatten(harm), q=0.2, granularity=granularity, skip_first=True, progress=False))
    assert sum(int(np.sum(v)) for v in top.values()) == sum(int(np.sum(v)) for v in nxt.values())
    assert not any(np.any(np.asarray(top[n]) & np.asarray(nxt[n])) for n in top)


@pytest.mark.parametrize("granularity", ["matrix", "row", "global"])
def test_extreme_fractions(granularity):
    harm = unflatten(score_tree(5, "specials"))
    none = select(harm, q=0.0, granularity=granularity, progress=False)
    assert not any(np.asarray(x).any() for x in jax.tree.leaves(none))
    every = select(harm, q=1.0, granularity=granularity, progress=False)
    assert all(np.asarray(x).all() for x in jax.tree.leaves(every))
    spared = select(harm, harm, q=1.0, p=1.0, granularity=granularity, progress=False)
    assert not any(np.asarray(x).any() for x in jax.tree.leaves(spared))


def test_large_tied_matrix_and_bfloat16():
    """Many bisection bits (300 rows, 700 columns), a tie at the cut in most rows, and bf16
    scores (ranked by their exact float32 value)."""
    rng = np.random.default_rng(6)
    s = rng.integers(0, 50, (300, 700)).astype(np.float32)
    harm = {"model.layers.0.mlp.up_proj.weight": s}
    for granularity, q in [("matrix", 0.123), ("row", 0.123), ("global", 0.0371)]:
        got = flatten(select(unflatten(harm), q=q, granularity=granularity, progress=False))
        if granularity == "row":
            want = np.stack([ref_top(row, int(np.floor(q * 700))) for row in s])
        else:
            want = ref_top(s.ravel(), int(np.floor(q * s.size))).reshape(s.shape)
        np.testing.assert_array_equal(np.asarray(got["model.layers.0.mlp.up_proj.weight"]), want)
    b = (rng.standard_normal((30, 40)) * 3).astype(ml_dtypes.bfloat16)  # many bf16 ties
    got = flatten(select(unflatten({"w": b}), q=0.3, progress=False))["w"]
    np.testing.assert_array_equal(np.asarray(got), ref_top(b.astype(np.float32).ravel(), 360).reshape(b.shape))


def test_sharded_scores_give_the_single_device_result():
    """Scores split over 8 devices (fsdp=4 x tensor=2) select exactly what host arrays do,
    and the mask keeps each score's sharding."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
    harm, retain = score_tree(7, "ties"), score_tree(8, "ties")

    def spec(shape):  # rows over tensor, columns over fsdp where they divide
        return P("tensor" if shape[0] % 2 == 0 else None, "fsdp" if shape[1] % 4 == 0 else None)

    def place(flat):
        return unflatten({n: jax.device_put(s, NamedSharding(mesh, spec(s.shape))) for n, s in flat.items()})

    for granularity in ["matrix", "row", "global"]:
        kwargs = dict(q=0.3, p=0.1, granularity=granularity, sign_flip=granularity == "row",
                      skip_first=granularity == "global", progress=False)
        sharded = flatten(select(place(harm), place(retain), **kwargs))
        host = flatten(select(unflatten(harm), unflatten(retain), **kwargs))
        want = reference(harm, retain, 0.3, 0.1, granularity, granularity == "row", granularity == "global")
        for n in HF_ORDER:
            assert sharded[n].sharding == NamedSharding(mesh, spec(harm[n].shape)), n
            np.testing.assert_array_equal(np.asarray(sharded[n]), np.asarray(host[n]), err_msg=n)
            np.testing.assert_array_equal(np.asarray(sharded[n]), want[n], err_msg=n)


def test_bad_arguments_are_named():
    harm = unflatten(score_tree(9, "normal"))
    with pytest.raises(ValueError, match="q must be a fraction"):
        select(harm, q=1.5)
    with pytest.raises(ValueError, match="granularity"):
        select(harm, q=0.1, granularity="column")
    retain = score_tree(9, "normal")
    retain["model.layers.3.mlp.up_proj.weight"] = np.zeros((12, 9), np.float32)
    with pytest.raises(MaskMismatchError, match=r"model\.layers\.3\.mlp\.up_proj\.weight.*\(12, 8\).*\(12, 9\)"):
        select(harm, unflatten(retain), q=0.1, p=0.1)
    del retain["model.layers.3.mlp.up_proj.weight"]
    with pytest.raises(MaskMismatchError, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
        select(harm, unflatten(retain), q=0.1, p=0.1)
    with pytest.raises(MaskMismatchError, match="floating point"):
        select({"w": np.ones((2, 2), np.int32)}, q=0.5)


@pytest.mark.parametrize("bits", [2, 4])
def test_global_radix_passes_select_exactly(monkeypatch, bits):
    """The accelerators' global selection (the threshold found several bits per pass on the
    host, one program per layer), forced on CPU: the same exact masks as the reference, with
    ties cut inside a matrix, controls, and a leaf outside the layers."""
    import importlib

    select_module = importlib.import_module("harmjax.masks.select_global")
    monkeypatch.setattr(select_module, "_radix_bits", lambda leaf: bits)
    cuts = []
    real_cut = select_module._cut_leaf_selector
    monkeypatch.setattr(select_module, "_cut_leaf_selector", lambda s: cuts.append(s) or real_cut(s))
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
    harm, retain = score_tree(7, "ties"), score_tree(8, "ties")
    harm["lm_head.weight"] = retain["lm_head.weight"] = np.zeros((3, 8), np.float32)
    order = HF_ORDER + ["lm_head.weight"]

    def place(flat):
        return unflatten({n: jax.device_put(s, NamedSharding(mesh, P(None, "fsdp" if s.shape[1] % 4 == 0 else None)))
                          for n, s in flat.items()})

    def ref(harm, retain, q, p, flip, skip):  # the reference over every leaf concatenated in HF order
        cat = {"all": np.concatenate([harm[m].ravel() for m in order])}
        cat_r = {"all": np.concatenate([retain[m].ravel() for m in order])} if retain is not None else None
        flat = reference(cat, cat_r, q, p, "matrix", flip, skip)["all"]
        out, start = {}, 0
        for n in order:
            out[n] = flat[start:start + harm[n].size].reshape(harm[n].shape)
            start += harm[n].size
        return out

    for q, p, flip, skip in [(0.3, 0.1, False, True), (0.05, 0.0, True, False), (0.0, 0.2, False, False),
                             (1.0, 0.0, False, False)]:
        want = ref(harm, retain if p else None, q, p, flip, skip)
        got = flatten(select(place(harm), place(retain) if p else None, q=q, p=p, granularity="global",
                             sign_flip=flip, skip_first=skip, progress=False))
        for n in order:
            np.testing.assert_array_equal(np.asarray(got[n]), want[n], err_msg=f"{n} q={q}")
    assert cuts, "tie-heavy scores must need a cut inside some matrix"


@pytest.mark.parametrize("bits", [1, 4])
@pytest.mark.parametrize("granularity", ["matrix", "row"])
def test_device_loop_digits_select_exactly(monkeypatch, bits, granularity):
    """The per-leaf loop program with other digit widths than the default (2 bits per pass
    for matrices): the same exact masks as the reference on sharded tie-heavy scores."""
    import importlib

    monkeypatch.setattr(importlib.import_module("harmjax.masks.select_device"), "_DEVICE_LOOP_BITS", bits)
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=1), jax.devices()[:2])
    harm, retain = score_tree(11, "specials"), score_tree(12, "ties")

    def place(flat):
        return unflatten({n: jax.device_put(s, NamedSharding(mesh, P("fsdp" if s.shape[0] % 2 == 0 else None)))
                          for n, s in flat.items()})

    for q, p, flip, skip in [(0.3, 0.1, False, True), (0.1, 0.5, True, False)]:
        got = flatten(select(place(harm), place(retain), q=q, p=p, granularity=granularity, sign_flip=flip,
                             skip_first=skip, progress=False))
        assert_same(unflatten(got), reference(harm, retain, q, p, granularity, flip, skip))


def test_iter_select_yields_select_leaves_in_hf_order():
    """`iter_select` checks its arguments when called (before any leaf) and then yields
    `select`'s leaves one at a time, in HF order (layer 10 after layer 9)."""
    from harmjax.masks import iter_select

    harm, retain = unflatten(score_tree(13, "normal")), unflatten(score_tree(14, "normal"))
    with pytest.raises(ValueError, match="q must be a fraction"):
        iter_select(harm, q=2.0)
    pairs = list(iter_select(harm, retain, q=0.2, p=0.1, progress=False))
    assert [name for name, _ in pairs] == HF_ORDER
    want = flatten(select(harm, retain, q=0.2, p=0.1, progress=False))
    for name, leaf in pairs:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want[name]), err_msg=name)
