"""Sparse masks and score candidates (`harmjax.masks.sparse`) against the dense references:
masks selected from candidates equal `select` on the dense scores bit for bit (ties, -0.0,
NaN, sharded or not), indices equal np.flatnonzero, and a sparse file round-trips."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from harmjax.masks import (
    jaccard, jaccard_indices, load_candidates, mask_from_indices, mask_indices, save_candidates, select,
    select_indices, top_candidates,
)
from harmjax.sharding import MeshConfig, make_mesh
from harmjax.tree import flatten, unflatten

NAMES = [f"model.layers.{i}.mlp.{n}.weight" for i in range(2) for n in ("up_proj", "down_proj")]
SHAPE = (16, 24)


def scores(seed):
    """Scores rounded to 0.1, so many ties, with +0.0/-0.0 and a NaN in every matrix."""
    rng = np.random.default_rng(seed)
    out = {}
    for n in NAMES:
        x = np.round(rng.standard_normal(SHAPE), 1).astype(np.float32)
        x[0, :5], x[1, :3], x[2, 2] = 0.0, -0.0, np.nan
        out[n] = x
    return unflatten(out)


def sharded(tree, sharding):
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


@pytest.fixture(scope="module")
def fsdp():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=1), jax.devices()[:2])
    return NamedSharding(mesh, P("fsdp", None))


@pytest.mark.parametrize("placed", [False, True])
def test_masks_from_candidates_equal_select_on_dense_scores(placed, fsdp, tmp_path):
    harm, retain = scores(1), scores(2)
    if placed:
        harm, retain = sharded(harm, fsdp), sharded(retain, fsdp)
    # Through the files the scores stage writes.
    shapes = {n: SHAPE for n in NAMES}
    save_candidates(str(tmp_path / "h"), top_candidates(harm, 0.3), shapes, {"kind": "harm"})
    save_candidates(str(tmp_path / "r"), top_candidates(retain, 0.3), shapes, {"kind": "retain"})
    ch, shapes_h, summary = load_candidates(str(tmp_path / "h"))
    cr, _, _ = load_candidates(str(tmp_path / "r"))
    assert shapes_h == shapes and summary["kind"] == "harm"
    for q, p in [(0.3, 0.1), (0.05, 0.3), (0.2, 0.0), (0.0, 0.1), (0.3, 0.3), (1 / 384, 0.0)]:
        ref = select(harm, retain, q=q, p=p, progress=False)
        idx = select_indices(ch, cr, shapes, q, p)
        mask = mask_from_indices(idx, shapes, {n: fsdp for n in NAMES} if placed else None)
        for n in NAMES:
            dense = np.asarray(flatten(ref)[n])
            np.testing.assert_array_equal(idx[n], np.flatnonzero(dense), err_msg=f"{q} {p} {n}")
            np.testing.assert_array_equal(np.asarray(flatten(mask)[n]), dense)
            if placed:
                assert flatten(mask)[n].sharding == fsdp
    with pytest.raises(ValueError, match=r"q=0.5 needs the top 192 entries .* candidates hold 115"):
        select_indices(ch, cr, shapes, 0.5, 0.1)


@pytest.mark.parametrize("where", ["host", "sharded"])
def test_candidates_are_the_ranked_top_entries(where, fsdp):
    """Against an independent ranking, on the host (NumPy's partition) and on two devices
    (the loop program, its compilations made on threads first)."""
    harm = scores(3)
    if where == "sharded":
        harm = sharded(harm, fsdp)
    cands = top_candidates(harm, 0.25)
    for n, x in flatten(harm).items():
        x = np.asarray(x)
        idx, values = cands[n]
        assert len(idx) == int(0.25 * x.size)
        np.testing.assert_array_equal(values.view(np.uint32), x.reshape(-1)[idx].view(np.uint32))
        # Independent ranking: a stable sort on (-score, index), NaN last, -0.0 == +0.0.
        flat = np.where(np.isnan(x.reshape(-1)), -np.inf, x.reshape(-1)) + 0.0
        order = np.lexsort((np.arange(flat.size), -flat))[: len(idx)]
        np.testing.assert_array_equal(idx, order, err_msg=n)


def test_jaccard_from_indices_equals_dense_jaccard():
    a = select(scores(4), None, q=0.2, progress=False)
    b = select(scores(5), None, q=0.2, progress=False)
    assert jaccard_indices(mask_indices(a), mask_indices(b)) == jaccard(a, b)
    empty = {n: np.zeros(0, np.int64) for n in NAMES}
    assert jaccard_indices(empty, empty) == 1.0
    with pytest.raises(ValueError, match="out of range|outside"):
        mask_from_indices({NAMES[0]: np.array([384])}, {NAMES[0]: SHAPE})


@pytest.mark.parametrize("count", [0, 1, 255, 256, 257, 40 * 48])
def test_device_indices_and_scatter_equal_numpy(count, tmp_path):
    """Indices found on the devices (padded to a power of two) equal np.flatnonzero, and the
    device scatter rebuilds the same dense mask in each sharding, for empty, bucket-edge and
    all-True leaves (tensor-split columns, fsdp-split rows, and both)."""
    from harmjax.masks import random_indices, save_mask, load_mask_indices

    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4])
    shape = (40, 48)
    rng = np.random.default_rng(count)
    dense = np.zeros(40 * 48, bool)
    dense[rng.choice(dense.size, count, replace=False)] = True
    dense = dense.reshape(shape)
    for spec in (P("fsdp", None), P(None, "tensor"), P("tensor", "fsdp")):
        sh = NamedSharding(mesh, spec)
        name = NAMES[0]
        got = mask_indices({name: jax.device_put(dense, sh)})[name]
        assert got.dtype == np.int64 and np.array_equal(got, np.flatnonzero(dense))
        back = flatten(mask_from_indices({name: got}, {name: shape}, {name: sh}))[name]
        assert back.sharding == sh and np.array_equal(np.asarray(back), dense)
    # The sparse random control draws the same positions as a dense draw from the same seed.
    rand = random_indices({NAMES[0]: count}, {NAMES[0]: shape, NAMES[1]: shape}, seed=3)
    ref = np.random.default_rng([3, 0]).choice(dense.size, size=count, replace=False)
    assert np.array_equal(rand[NAMES[0]], np.sort(ref)) and rand[NAMES[1]].size == 0
    # save_mask of a device mask writes exactly these indices
    save_mask(str(tmp_path / "m"), {NAMES[0]: jax.device_put(dense, NamedSharding(mesh, P("fsdp", "tensor")))})
    assert np.array_equal(load_mask_indices(str(tmp_path / "m"))[0][NAMES[0]], np.flatnonzero(dense))
