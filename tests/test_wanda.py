"""The wanda and magnitude score kinds against PyTorch: wanda is |W| * the L2 norm of each
input feature of a linear map over the non-padding tokens (collected with forward hooks on the
transformers model), magnitude is |W|; they combine with the gradient kinds in one pass, resume
from a scan checkpoint, and serve either side of the set difference."""

import jax
import numpy as np
import pytest
import torch

import harmjax
from harmjax.attribution import attribute, scan
from harmjax.attribution.core import names_for
from harmjax.attribution.step import init_accumulators, jit_accumulate, jit_finalize
from harmjax.errors import HarmjaxError, ScoreKindError
from harmjax.sharding import MeshConfig, make_mesh
from harmjax.tree import flatten
from tests.hf_reference import left_padded_batch, save_tiny_with_tokenizer, tiny_hf_model, tiny_tokenizer
from tests.test_attribution import EXAMPLES, ONE_BUCKET, _assert_close, _torch_scores

HARMFUL, BENIGN = EXAMPLES[:3], EXAMPLES[2:]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf_model = tiny_hf_model("llama", seed=3)
    return hf_model, save_tiny_with_tokenizer(hf_model, tmp_path_factory.mktemp("tiny"))


def _hook_wanda(hf_model, runs):
    """|W| * sqrt(sum of x^2 over the tokens where mask == 1) for every *_proj weight, with x
    each linear's input as PyTorch's forward pre-hooks see it. `runs`: (ids, mask, positions)."""
    sums, hooks, run = {}, [], {}
    for name, module in hf_model.named_modules():
        if name.endswith("_proj"):
            def hook(_, args, name=name):
                sums[name] = sums.get(name, 0) + (args[0].double() ** 2 * run["mask"][..., None]).sum((0, 1))
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        for ids, mask, positions in runs:
            run["mask"] = torch.tensor(mask, dtype=torch.float64)
            with torch.no_grad():
                hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                         position_ids=None if positions is None else torch.tensor(positions))
    finally:
        for h in hooks:
            h.remove()
    params = dict(hf_model.named_parameters())
    return {f"{n}.weight": (params[f"{n}.weight"].detach().double().abs() * s.sqrt()).numpy() for n, s in sums.items()}


def _magnitude(hf_model):
    return {n: p.detach().abs().numpy() for n, p in hf_model.named_parameters() if n.endswith("_proj.weight")}


@pytest.mark.parametrize("layerwise", [False, True])
def test_wanda_matches_torch_hooks_with_left_padding(tiny, layerwise):
    """Two left-padded micro-batches (the second with a filler row), through the scan step:
    padding and filler rows count for nothing, the micro-batches add up."""
    hf_model, path = tiny
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    first, second = left_padded_batch(seed=0), left_padded_batch(seed=1)
    second[1][2] = 0  # a filler row: nothing of it counts
    names = names_for(model.config, None)
    step = jit_accumulate(model.config, model.mesh, names, "wanda", layerwise=layerwise)
    accs = init_accumulators(model.config, model.mesh, names, "act")
    for ids, mask, _ in (first, second):
        accs, _ = step(model.params, accs, ids.astype(np.int32), mask.astype(np.int32), mask.astype(np.int32))
    ours = flatten(jit_finalize(model.config, model.mesh, names, "wanda")(model.params, accs))
    ref = _hook_wanda(hf_model, [first, second])
    assert len(ref) == 21
    _assert_close(ours, ref)


def test_combined_kinds_on_a_mesh_resume_and_match_references(tiny, tmp_path):
    """("wanda", "magnitude") in one pass on an 8-device mesh (wanda's sums split over data,
    fsdp and tensor), stopped and resumed from its checkpoint, equals the references; the
    scan's right padding and filler rows do not count toward wanda. (Gradient kinds with wanda:
    the set-difference test.)"""
    hf_model, path = tiny
    kinds = ("wanda", "magnitude")
    many = harmjax.load(path, mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    first = scan(many, EXAMPLES, kinds, batch_size=2, checkpoint_dir=str(tmp_path), checkpoint_every=1,
                 stop_after=1, **ONE_BUCKET)
    result = scan(many, EXAMPLES, kinds, batch_size=2, checkpoint_dir=str(tmp_path), **ONE_BUCKET)
    assert first.resumed_from == 0 and result.resumed_from == 1 and set(result.scores) == set(kinds)
    tok = tiny_tokenizer()
    unpadded = [(np.array([ids]), np.ones((1, len(ids)), np.int64), None)
                for ids in (tok(e["prompt"] + "\n" + e["response"])["input_ids"] for e in EXAMPLES)]
    _assert_close(flatten(result.scores["wanda"]), _hook_wanda(hf_model, unpadded))
    _assert_close(flatten(result.scores["magnitude"]), _magnitude(hf_model))


def _top(scores: np.ndarray, fraction: float) -> np.ndarray:
    """NumPy's T_f: the floor(f * n) largest entries, ties to the lowest flat index."""
    flat = scores.ravel()
    chosen = np.zeros(flat.shape, bool)
    chosen[np.lexsort((np.arange(flat.size), -flat))[: int(np.floor(fraction * flat.size))]] = True
    return chosen.reshape(scores.shape)


def test_set_difference_with_wanda_and_magnitude_on_either_side(tiny):
    """A two-kind pass equals the separate wanda pass and PyTorch's harm scores; harm \\
    wanda(benign) and wanda(harmful) \\ magnitude masks through the public API equal NumPy's
    set difference of the score trees, and pruning zeroes exactly those weights."""
    hf_model, path = tiny
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    kw = dict(batch_size=3, **ONE_BUCKET)
    as_numpy = lambda tree: {n: np.asarray(v) for n, v in flatten(tree).items()}  # noqa: E731
    combined = {k: as_numpy(v) for k, v in scan(model, HARMFUL, ("harm", "wanda"), **kw).scores.items()}
    harm, wanda_harmful = combined["harm"], combined["wanda"]
    _assert_close(harm, _torch_scores(hf_model, HARMFUL)["harm"])
    _assert_close(wanda_harmful, as_numpy(harmjax.score(model, HARMFUL, "wanda", **kw)))
    # magnitude alone reads no data.
    alone = scan(model, BENIGN, "magnitude", **kw)
    assert alone.num_tokens == 0 and np.isnan(alone.mean_loss)
    utility = {"wanda": as_numpy(harmjax.score(model, BENIGN, "wanda", **kw)), "magnitude": as_numpy(alone.scores)}
    _assert_close(utility["magnitude"], _magnitude(hf_model))
    # NumPy trees: selection on the host (what is checked here is the kinds, not the engines).
    q, p = 0.1, 0.2
    weights = flatten(model.params)
    for top, bottom in ((harm, utility["wanda"]), (wanda_harmful, utility["magnitude"])):
        mask = flatten(harmjax.select(top, bottom, q=q, p=p, progress=False))
        pruned = flatten(harmjax.apply_mask(model.params, mask))
        for name in top:
            expected = _top(top[name], q) & ~_top(bottom[name], p)
            assert expected.sum() > 0
            np.testing.assert_array_equal(np.asarray(mask[name]), expected, err_msg=name)
            np.testing.assert_array_equal(np.asarray(pruned[name]), np.where(expected, 0, np.asarray(weights[name])))


def test_kind_names_are_checked(tiny):
    _, path = tiny
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    # A typo is one HarmjaxError line (launch's run_app) naming every known kind.
    with pytest.raises(ScoreKindError, match=r"Unknown score kind 'wandaa'; choose one of .*'wanda', 'magnitude'") as e:
        scan(model, EXAMPLES, ("harm", "wandaa"), **ONE_BUCKET)
    assert isinstance(e.value, HarmjaxError) and isinstance(e.value, ValueError)
    # attribute (any JAX model) has no linear inputs to sum: wanda is refused, magnitude works.
    params = {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3) - 2}}
    batches = [{"input_ids": np.ones((1, 4)), "attention_mask": np.ones((1, 4)), "loss_mask": np.ones((1, 4))}]
    with pytest.raises(ScoreKindError, match="harmjax.scan"):
        attribute(lambda *a: None, params, batches, ("harm", "wanda"), progress=False)
    out = attribute(lambda *a: None, params, batches, "magnitude", progress=False)
    np.testing.assert_array_equal(np.asarray(out["dense"]["kernel"]), np.abs(params["dense"]["kernel"]))
