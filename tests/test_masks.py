"""Masks as values (algebra, counts), apply_mask, storage, the PyTorch round trip and launch/prune.py."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

import harmjax
from harmjax.errors import MissingFileError
from harmjax.masks import (
    MaskMismatchError,
    PlotDependencyError,
    apply_mask,
    check_mask_fits,
    complement,
    counts_grid,
    difference,
    export_safetensors,
    format_counts,
    intersect_all,
    intersection,
    jaccard,
    load_mask,
    load_mask_indices,
    load_safetensors_tree,
    load_scores,
    mask_counts,
    plot_mask_counts,
    save_mask,
    save_scores,
    select,
    union,
    union_all,
)
from harmjax.model.param_specs import linear_names
from harmjax.sharding import MeshConfig, make_mesh
from harmjax.tree import flatten, unflatten
from tests.hf_reference import left_padded_batch, save_tiny, tiny_hf_model, torch_logits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"self_attn.q_proj.weight": (6, 4), "mlp.down_proj.weight": (4, 10)}


def random_mask(seed, density=0.3, layers=3):
    rng = np.random.default_rng(seed)
    return {f"model.layers.{i}.{n}": rng.random(s) < density for i in range(layers) for n, s in SHAPES.items()}


def random_params(seed):
    rng = np.random.default_rng(seed)
    flat = {f"model.layers.{i}.{n}": rng.standard_normal(s).astype(np.float32)
            for i in range(3) for n, s in SHAPES.items()}
    flat["model.embed_tokens.weight"] = rng.standard_normal((11, 4)).astype(np.float32)
    flat["model.layers.0.mlp.down_proj.bias"] = rng.standard_normal(4).astype(np.float32)
    return unflatten(flat)


def host(tree):
    return {n: np.asarray(x) for n, x in flatten(tree).items()}


def single_device_mesh():
    return make_mesh(MeshConfig(data=1), jax.devices()[:1])


# ---- algebra and counts ------------------------------------------------------------------


def test_set_algebra_matches_numpy():
    a, b, c = random_mask(0), random_mask(1), random_mask(2, density=0.6)
    ta, tb, tc = unflatten(a), unflatten(b), unflatten(c)
    for got, want in [
        (union(ta, tb), {n: a[n] | b[n] for n in a}),
        (intersection(ta, tb), {n: a[n] & b[n] for n in a}),
        (difference(ta, tb), {n: a[n] & ~b[n] for n in a}),
        (complement(ta), {n: ~a[n] for n in a}),
        (intersect_all([ta, tb, tc]), {n: a[n] & b[n] & c[n] for n in a}),
        (union_all([ta, tb, tc]), {n: a[n] | b[n] | c[n] for n in a}),
    ]:
        got = host(got)
        assert sorted(got) == sorted(want)
        for n in want:
            np.testing.assert_array_equal(got[n], want[n], err_msg=n)
    both = sum(int((a[n] & b[n]).sum()) for n in a)
    either = sum(int((a[n] | b[n]).sum()) for n in a)
    assert jaccard(ta, tb) == pytest.approx(both / either)
    assert jaccard(ta, ta) == 1.0
    empty = {n: np.zeros_like(v) for n, v in a.items()}
    assert jaccard(unflatten(empty), unflatten(empty)) == 1.0
    assert jaccard(ta, unflatten(empty)) == 0.0


def test_algebra_rejects_mismatched_masks():
    a, b = random_mask(0), random_mask(1)
    b["model.layers.1.mlp.down_proj.weight"] = np.zeros((4, 9), bool)
    with pytest.raises(MaskMismatchError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*\(4, 10\).*\(4, 9\)"):
        union(unflatten(a), unflatten(b))
    del b["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(MaskMismatchError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*only in the first"):
        intersection(unflatten(a), unflatten(b))
    a["model.layers.0.self_attn.q_proj.weight"] = a["model.layers.0.self_attn.q_proj.weight"].astype(np.float32)
    with pytest.raises(MaskMismatchError, match="float32, expected bool"):
        complement(unflatten(a))


def test_mask_counts_per_layer_and_projection():
    m = random_mask(3)
    m["model.layers.10.mlp.down_proj.weight"] = np.ones((4, 10), bool)  # numeric layer order
    params = random_params(0)
    counts = mask_counts(unflatten(m), params=params)
    total = sum(int(v.sum()) for v in m.values())
    assert counts["total"] == total
    assert counts["scored"] == sum(v.size for v in m.values())
    assert counts["fraction_scored"] == pytest.approx(total / counts["scored"])
    n_params = sum(x.size for x in jax.tree.leaves(params))
    assert counts["num_params"] == n_params
    assert counts["fraction_params"] == pytest.approx(total / n_params)
    assert list(counts["per_layer"]) == ["0", "1", "2", "10"]
    assert list(counts["per_projection"]) == ["q_proj", "down_proj"]
    for i in ["0", "1", "2"]:
        for n, short in [("self_attn.q_proj.weight", "q_proj"), ("mlp.down_proj.weight", "down_proj")]:
            assert counts["per_layer_projection"][i][short] == int(m[f"model.layers.{i}.{n}"].sum())
        assert counts["per_layer"][i] == sum(int(m[f"model.layers.{i}.{n}"].sum()) for n in SHAPES)
    assert counts["per_projection"]["down_proj"] == sum(int(v.sum()) for n, v in m.items() if "down_proj" in n)
    assert mask_counts(unflatten(m))["fraction_params"] is None
    text = format_counts(counts)
    assert f"pruned {total} of {counts['scored']}" in text and "down_proj" in text
    layers, projections, grid = counts_grid(counts)
    assert layers == ["0", "1", "2", "10"] and projections == ["q_proj", "down_proj"]
    assert grid[3, 1] == 40 and grid.sum() == total


def test_plot_mask_counts(tmp_path):
    path = str(tmp_path / "counts.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(PlotDependencyError, match="pip install"):
            plot_mask_counts(unflatten(random_mask(4)), path)
        return
    assert plot_mask_counts(unflatten(random_mask(4)), path) == path
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---- apply_mask ---------------------------------------------------------------------------


def test_apply_mask_zeroes_or_scales_only_masked_weights():
    params = random_params(1)
    m = random_mask(5)
    flat_p = flatten(params)
    for alpha in [0.0, 0.5]:
        out = apply_mask(params, unflatten(m), alpha=alpha)
        flat_o = flatten(out)
        for n, w in flat_p.items():
            if n in m:
                want = np.where(m[n], w * alpha, w)
                got = np.asarray(flat_o[n])
                np.testing.assert_array_equal(got, want, err_msg=n)
                if alpha == 0:
                    assert not np.signbit(got[m[n]]).any(), "pruned weights must be +0"
            else:
                assert flat_o[n] is w, f"{n} not in the mask must be the same object"
    # the input is not modified
    np.testing.assert_array_equal(flat_p["model.layers.0.self_attn.q_proj.weight"],
                                  flatten(random_params(1))["model.layers.0.self_attn.q_proj.weight"])


def test_all_false_mask_is_a_bit_exact_noop_and_dtype_sharding_are_kept():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4])
    sharding = NamedSharding(mesh, P("tensor", "fsdp"))
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 4)).astype(ml_dtypes.bfloat16)
    w[0, 0] = -0.0
    params = {"model": {"layers": {"0": {"mlp": {"up_proj": {"weight": jax.device_put(w, sharding)}}}}}}
    none = {"model": {"layers": {"0": {"mlp": {"up_proj": {"weight": np.zeros((8, 4), bool)}}}}}}
    out = apply_mask(params, none)["model"]["layers"]["0"]["mlp"]["up_proj"]["weight"]
    assert out.dtype == jnp.bfloat16 and out.sharding == sharding
    np.testing.assert_array_equal(np.asarray(out).view(np.uint16), w.view(np.uint16))
    some = {"model": {"layers": {"0": {"mlp": {"up_proj": {"weight": rng.random((8, 4)) < 0.5}}}}}}
    half = apply_mask(params, some, alpha=0.5)["model"]["layers"]["0"]["mlp"]["up_proj"]["weight"]
    m = some["model"]["layers"]["0"]["mlp"]["up_proj"]["weight"]
    want = np.where(m, (w.astype(np.float32) * 0.5).astype(ml_dtypes.bfloat16), w)
    assert half.dtype == jnp.bfloat16 and half.sharding == sharding
    np.testing.assert_array_equal(np.asarray(half).view(np.uint16), want.view(np.uint16))
    # a mask on one device (as loaded without params) still applies to the sharded weights
    on_one = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[5]), some)
    zeroed = apply_mask(params, on_one)["model"]["layers"]["0"]["mlp"]["up_proj"]["weight"]
    assert zeroed.sharding == sharding
    np.testing.assert_array_equal(np.asarray(zeroed).view(np.uint16),
                                  np.where(m, np.zeros_like(w), w).view(np.uint16))


def test_check_mask_fits_names_the_bad_path():
    params = random_params(3)
    m = random_mask(6)
    check_mask_fits(params, unflatten(m))
    bad = dict(m)
    bad["model.layers.2.mlp.down_proj.weight"] = np.zeros((10, 4), bool)
    with pytest.raises(MaskMismatchError, match=r"model\.layers\.2\.mlp\.down_proj\.weight.*\(10, 4\).*\(4, 10\)"):
        apply_mask(params, unflatten(bad))
    bad = dict(m)
    bad["model.layers.7.mlp.down_proj.weight"] = np.zeros((4, 10), bool)
    with pytest.raises(MaskMismatchError, match=r"model\.layers\.7\.mlp\.down_proj\.weight.*not a parameter"):
        check_mask_fits(params, unflatten(bad))
    bad = dict(m)
    bad["model.layers.0.mlp.down_proj.weight"] = np.zeros((4, 10), np.uint8)
    with pytest.raises(MaskMismatchError, match="uint8, expected bool"):
        check_mask_fits(params, unflatten(bad))


# ---- storage ------------------------------------------------------------------------------


def test_export_safetensors_is_readable_by_the_safetensors_package(tmp_path):
    m = random_mask(7)
    scores = {n: np.random.default_rng(1).standard_normal(v.shape).astype(np.float32) for n, v in m.items()}
    export_safetensors(unflatten(m), str(tmp_path / "mask.safetensors"))
    export_safetensors(unflatten(scores), str(tmp_path / "scores.safetensors"))
    read_m = safetensors.numpy.load_file(str(tmp_path / "mask.safetensors"))
    read_s = safetensors.numpy.load_file(str(tmp_path / "scores.safetensors"))
    assert sorted(read_m) == sorted(m) and sorted(read_s) == sorted(scores)
    for n in m:
        assert read_m[n].dtype == np.uint8
        np.testing.assert_array_equal(read_m[n], m[n].astype(np.uint8))
        np.testing.assert_array_equal(read_s[n], scores[n])
    back = host(load_safetensors_tree(str(tmp_path / "mask.safetensors")))
    for n in m:
        assert back[n].dtype == np.bool_
        np.testing.assert_array_equal(back[n], m[n])
    # straight into shardings, matched by name
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=1), jax.devices()[:2])
    sh = NamedSharding(mesh, P("fsdp", None))
    placed = flatten(load_safetensors_tree(str(tmp_path / "scores.safetensors"), unflatten({n: sh for n in scores})))
    for n in scores:
        assert placed[n].sharding == sh
        np.testing.assert_array_equal(np.asarray(placed[n]), scores[n])


def test_save_and_load_mask_and_scores(tmp_path):
    m = unflatten(random_mask(8))
    params = random_params(4)
    out = save_mask(str(tmp_path / "mask_dir"), m, {"q": 1e-5, "p": 5e-5, "granularity": "matrix",
                                                    "model": "tiny", "seed": 0}, params=params)
    assert sorted(os.listdir(out)) == ["mask_indices.safetensors", "summary.json"]
    # The sparse file: per HF name, int64 flat indices equal to np.flatnonzero of the dense mask.
    stored = safetensors.numpy.load_file(os.path.join(out, "mask_indices.safetensors"))
    assert stored.keys() == random_mask(8).keys()
    for n, v in random_mask(8).items():
        assert stored[n].dtype == np.int64
        np.testing.assert_array_equal(stored[n], np.flatnonzero(v), err_msg=n)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["kind"] == "mask" and summary["q"] == 1e-5 and summary["model"] == "tiny"
    assert summary["harmjax_version"] == harmjax.__version__
    assert summary["counts"]["total"] == sum(int(v.sum()) for v in random_mask(8).values())
    assert summary["fraction_pruned_params"] == pytest.approx(
        summary["counts"]["total"] / sum(x.size for x in jax.tree.leaves(params)))
    loaded, loaded_summary = load_mask(out)
    assert loaded_summary == summary
    for n, v in random_mask(8).items():
        np.testing.assert_array_equal(np.asarray(flatten(loaded)[n]), v, err_msg=n)
    # restored into the params' shardings
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=1), jax.devices()[:2])
    sh = NamedSharding(mesh, P("fsdp", None))
    scored = random_mask(8)
    sharded_params = unflatten({n: jax.device_put(x, sh) if n in scored else x for n, x in flatten(params).items()})
    loaded, _ = load_mask(out, params=sharded_params)
    for n, v in random_mask(8).items():
        assert flatten(loaded)[n].sharding == sh
        np.testing.assert_array_equal(np.asarray(flatten(loaded)[n]), v)
    other = dict(flatten(params))
    other["model.layers.0.self_attn.q_proj.weight"] = np.zeros((4, 6), np.float32)
    with pytest.raises(MaskMismatchError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        load_mask(out, params=unflatten(other))
    # a mask dir made in PyTorch: only mask.safetensors, uint8 tensors
    torch_dir = tmp_path / "from_torch"
    torch_dir.mkdir()
    safetensors.torch.save_file({n: torch.from_numpy(v.astype(np.uint8)) for n, v in random_mask(9).items()},
                                str(torch_dir / "mask.safetensors"))
    loaded, summary = load_mask(str(torch_dir))
    assert summary == {}
    for n, v in random_mask(9).items():
        assert np.asarray(flatten(loaded)[n]).dtype == np.bool_
        np.testing.assert_array_equal(np.asarray(flatten(loaded)[n]), v)
    with pytest.raises(MissingFileError, match="mask.safetensors"):
        load_mask(str(tmp_path / "nowhere"))
    # the dense uint8 copy on request; a mask dir of the old layout (orbax + dense file) still loads
    dense_dir = save_mask(str(tmp_path / "dense"), m, dense=True)
    assert sorted(os.listdir(dense_dir)) == ["mask.safetensors", "mask_indices.safetensors", "summary.json"]
    from harmjax import checkpoint

    old_dir = tmp_path / "old_layout"
    checkpoint.save_tree(str(old_dir / "mask"), m, metadata={"q": 0.5})
    export_safetensors(m, str(old_dir / "mask.safetensors"), progress=False)
    for d in (dense_dir, str(old_dir)):
        loaded, _ = load_mask(d, params=sharded_params)
        for n, v in random_mask(8).items():
            np.testing.assert_array_equal(np.asarray(flatten(loaded)[n]), v)
        indices, shapes = load_mask_indices(d)
        assert shapes == {n: v.shape for n, v in random_mask(8).items()}
        for n, v in random_mask(8).items():
            np.testing.assert_array_equal(indices[n], np.flatnonzero(v))
    # scores
    scores = {n: np.random.default_rng(2).standard_normal(v.shape).astype(np.float32) for n, v in random_mask(1).items()}
    save_scores(str(tmp_path / "s"), unflatten(scores), {"kind": "harm", "nsamples": 4})
    got, s_summary = load_scores(str(tmp_path / "s"))
    assert s_summary["kind"] == "harm" and s_summary["nsamples"] == 4
    for n, v in scores.items():
        np.testing.assert_array_equal(np.asarray(flatten(got)[n]), v)


# ---- the PyTorch round trip --------------------------------------------------------------


def score_tree_for(config, seed):
    rng = np.random.default_rng(seed)
    from harmjax.model.param_specs import param_specs

    specs = param_specs(config)
    names = [f"model.layers.{i}.{lin}.weight" for i in range(config.num_layers) for lin in linear_names(config)]
    return unflatten({n: rng.standard_normal(specs[n].shape).astype(np.float32) for n in names})


def test_exported_mask_applied_in_pytorch_gives_the_same_logits(tmp_path):
    hf_model = tiny_hf_model("llama")
    model = harmjax.load(save_tiny(hf_model, tmp_path / "src"), dtype="float32", mesh=single_device_mesh())
    mask = select(score_tree_for(model.config, 0), score_tree_for(model.config, 1), q=0.05, p=0.02, progress=False)
    out = save_mask(str(tmp_path / "mask"), mask, {"model": "tiny llama"}, dense=True)

    ids, attn, positions = left_padded_batch()
    before = torch_logits(hf_model, ids, attn, positions)
    # The README's one line, on the sparse file:
    with torch.no_grad():
        for name, idx in safetensors.torch.load_file(f"{out}/mask_indices.safetensors").items(): hf_model.get_parameter(name).view(-1)[idx] = 0  # noqa: E501,E701
    ref = torch_logits(hf_model, ids, attn, positions)
    state = hf_model.state_dict()
    # The dense uint8 copy (dense=True) marks the same entries.
    tensors = safetensors.torch.load_file(os.path.join(out, "mask.safetensors"))
    assert len(tensors) == 7 * model.config.num_layers
    for name, m in tensors.items():
        assert m.dtype == torch.uint8
        np.testing.assert_array_equal(m.bool().numpy(), np.asarray(flatten(mask)[name]))

    pruned = apply_mask(model.params, mask)
    ours = np.asarray(harmjax.forward(pruned, model.config, jnp.asarray(ids), jnp.asarray(attn)))
    valid = attn.astype(bool)
    assert np.abs(ref - before)[valid].max() > 1e-2, "the mask must change the model"
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4 * ref[valid].std())
    # and the zeroed entries are exactly the mask's, in HF orientation
    for name, m in tensors.items():
        np.testing.assert_array_equal(np.asarray(flatten(pruned)[name]) == 0, state[name].numpy() == 0)


# ---- launch/prune.py ----------------------------------------------------------------------


def _prune(*args):
    result = subprocess.run(
        [sys.executable, "-m", "launch.prune", "--config=configs/prune.py", *args], cwd=REPO,
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_prune_launcher_end_to_end(tmp_path):
    hf_model = tiny_hf_model("qwen2")
    src = save_tiny(hf_model, tmp_path / "src")
    config = harmjax.load(src, mesh=single_device_mesh()).config
    harm, retain = score_tree_for(config, 2), score_tree_for(config, 3)
    save_scores(str(tmp_path / "harm"), harm, {"kind": "harm", "model": src, "data": "tiny-harm", "nsamples": 5, "seed": 0})
    save_scores(str(tmp_path / "retain"), retain, {"kind": "retain", "model": src, "data": "tiny-benign", "nsamples": 5, "seed": 0})

    out = _prune(f"--config.harm_scores={tmp_path}/harm", f"--config.retain_scores={tmp_path}/retain",
                 "--config.q=0.1", "--config.p=0.05", "--config.granularity=row", f"--config.output_dir={tmp_path}/a")
    mask_a, summary = load_mask(str(tmp_path / "a"))
    want_a = select(harm, retain, q=0.1, p=0.05, granularity="row", progress=False)
    for n, v in flatten(want_a).items():
        np.testing.assert_array_equal(np.asarray(flatten(mask_a)[n]), np.asarray(v), err_msg=n)
    total = sum(int(np.asarray(v).sum()) for v in flatten(want_a).values())
    assert summary["q"] == 0.1 and summary["p"] == 0.05 and summary["granularity"] == "row"
    assert summary["model"] == src and summary["data"] == "tiny-harm" and summary["nsamples"] == 5
    assert summary["retain_scores"]["data"] == "tiny-benign"
    assert summary["counts"]["total"] == total
    assert summary["fraction_pruned_params"] == pytest.approx(total / sum(p.numel() for p in hf_model.parameters()))
    assert f"pruned {total} of" in out

    # a second mask dir, made in-process, to intersect with the launcher's
    want_b = select(harm, q=0.2, granularity="global", sign_flip=True, progress=False)
    save_mask(str(tmp_path / "b"), want_b, {"model": src})
    _prune(f"--config.intersect=('{tmp_path}/a', '{tmp_path}/b')", f"--config.output_dir={tmp_path}/ab")
    mask_ab, summary_ab = load_mask(str(tmp_path / "ab"))
    assert summary_ab["method"] == "intersect" and summary_ab["sources"] == [f"{tmp_path}/a", f"{tmp_path}/b"]
    for n, v in flatten(intersection(want_a, want_b)).items():
        np.testing.assert_array_equal(np.asarray(flatten(mask_ab)[n]), np.asarray(v), err_msg=n)

    # score candidates (the experiment's scores stage) select the same matrix-granularity mask
    from harmjax.masks import save_candidates, top_candidates

    shapes = {n: tuple(v.shape) for n, v in flatten(harm).items()}
    for name, tree in (("harm_c", harm), ("retain_c", retain)):
        save_candidates(str(tmp_path / name), top_candidates(tree, 0.1), shapes, {"kind": name, "model": src})
    _prune(f"--config.harm_scores={tmp_path}/harm_c", f"--config.retain_scores={tmp_path}/retain_c",
           "--config.q=0.1", "--config.p=0.05", f"--config.output_dir={tmp_path}/c")
    mask_c, _ = load_mask(str(tmp_path / "c"))
    for n, v in flatten(select(harm, retain, q=0.1, p=0.05, progress=False)).items():
        np.testing.assert_array_equal(np.asarray(flatten(mask_c)[n]), np.asarray(v), err_msg=n)


def test_random_like_keeps_every_matrix_count():
    """The random control: same count per matrix, positions seeded and uniform-looking, shardings kept."""
    from harmjax.masks import random_like
    from harmjax.sharding import MeshConfig, make_mesh

    rng = np.random.default_rng(0)
    mask = {"a": {"w": rng.random((40, 32)) < 0.1}, "b": {"w": np.zeros((7,), bool)}, "c": {"w": np.ones((3, 4), bool)}}
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
    mask["a"]["w"] = jax.device_put(mask["a"]["w"], sharding)
    one, same, other = random_like(mask, 1), random_like(mask, 1), random_like(mask, 2)
    for key in ("a", "b", "c"):
        assert int(np.sum(one[key]["w"])) == int(np.sum(mask[key]["w"]))
        np.testing.assert_array_equal(np.asarray(one[key]["w"]), np.asarray(same[key]["w"]))
    assert not np.array_equal(np.asarray(one["a"]["w"]), np.asarray(other["a"]["w"]))
    assert not np.array_equal(np.asarray(one["a"]["w"]), np.asarray(mask["a"]["w"]))
    assert one["a"]["w"].sharding == sharding
    # Uniform positions: over many seeds every entry of a 1-in-4 mask is hit about 1/4 of the time.
    small = {"m": np.arange(16).reshape(4, 4) % 4 == 0}
    hits = sum(np.asarray(random_like(small, s)["m"], np.int64) for s in range(400))
    assert abs(hits.mean() / 400 - 0.25) < 1e-9 and hits.min() > 60 and hits.max() < 140
