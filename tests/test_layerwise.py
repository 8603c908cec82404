"""Per-block scan programs (`harmjax.attribution.layerwise`): scores equal PyTorch autograd for
every kind, with and without remat, on a tensor-parallel mesh through the fused kernel, and for
a scope that scores some layers only; the blocks' residuals hold no copy of the weights; the
memory preflight refuses a step that cannot fit, before any work."""

import re

import jax
import numpy as np
import pytest

import harmjax
from harmjax.attribution import scan
from harmjax.attribution.core import accumulator_mode, names_for
from harmjax.attribution.step import abstract_accumulators, jit_accumulate
from harmjax.errors import DeviceMemoryError
from harmjax.sharding import MeshConfig, batch_sharding, make_mesh
from harmjax.tree import flatten
from tests.hf_reference import save_tiny_with_tokenizer, tiny_hf_model
from tests.test_attribution import EXAMPLES, ONE_BUCKET, _assert_close, _torch_scores


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf_model = tiny_hf_model("llama", seed=3)
    path = save_tiny_with_tokenizer(hf_model, tmp_path_factory.mktemp("tiny"))
    return hf_model, path, _torch_scores(hf_model, EXAMPLES)


@pytest.mark.parametrize("kind,remat", [("harm", False), ("retain", True), ("retain_mean", False),
                                        (("retain", "harm"), True)])
def test_layerwise_scores_match_torch_autograd(tiny, kind, remat):
    hf_model, path, ref = tiny
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    # Two buckets: the programs compile once per batch shape and serve every block.
    result = scan(model, EXAMPLES, kind, batch_size=3, num_buckets=2, remat=remat, layerwise=True, progress=False)
    if isinstance(kind, str):
        _assert_close(flatten(result.scores), ref[kind])
    else:
        for k in kind:
            _assert_close(flatten(result.scores[k]), ref[k])


def test_layerwise_scope_of_some_layers(tiny):
    """Only the last layer's MLP scored: the backward stops above the unscored blocks."""
    hf_model, path, ref = tiny
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    last = model.config.num_layers - 1
    scope = (f"model.layers.{last}.mlp.*_proj.weight",)
    ours = flatten(scan(model, EXAMPLES, "harm", scope=scope, batch_size=3, layerwise=True, **ONE_BUCKET).scores)
    assert set(ours) == {f"model.layers.{last}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    _assert_close(ours, {n: ref["harm"][n] for n in ours})


def test_layerwise_under_tensor_parallelism_through_the_kernel(interpret, kernel_calls, tmp_path):
    """Gemma-2 (sliding and full layers: two block programs; sandwich norms; soft-caps) on a
    (fsdp 2, tensor 2) mesh, the retain kind through the fused kernel in Pallas' interpreter."""
    calls = kernel_calls
    hf_model = tiny_hf_model("gemma2", seed=5)
    path = save_tiny_with_tokenizer(hf_model, tmp_path)
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4]))
    assert len(set(model.config.layer_types)) == 2
    ours = flatten(scan(model, EXAMPLES, "retain", batch_size=4, layerwise=True, **ONE_BUCKET).scores)
    assert calls, "the fused kernel was not used"
    _assert_close(ours, _torch_scores(hf_model, EXAMPLES)["retain"])


def test_block_residuals_hold_no_copy_of_the_weights(tiny):
    """What each block keeps for its backward is activations only: the weights, accumulators
    and tables go to the backward program again instead of being returned as copies."""
    _, path, _ = tiny
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    c, mesh = model.config, model.mesh
    names = names_for(c, None)
    step = jit_accumulate(c, mesh, names, "harm", layerwise=True)
    ids = jax.ShapeDtypeStruct((1, 8), np.int32, sharding=batch_sharding(mesh))
    parts = step.memory_breakdown(model.params, abstract_accumulators(c, mesh, names, accumulator_mode("harm")),
                                  ids, ids, ids)
    block_weights = 4 * sum(x.size for x in jax.tree.leaves(model.params["model"]["layers"]["0"]))
    # 1 x 8 tokens of activations per block: about 38 KB; a copy of its weights would add 122 KB.
    assert 0 < parts["kept"] / c.num_layers < block_weights / 2
    with_remat = jit_accumulate(c, mesh, names, "harm", remat=True, layerwise=True).memory_breakdown(
        model.params, abstract_accumulators(c, mesh, names, "signed"), ids, ids, ids)
    assert with_remat["kept"] == c.num_layers * 8 * c.hidden_size * 4  # each block's input only


def test_layerwise_preflight_refuses_before_any_work(tiny, tmp_path):
    _, path, ref = tiny
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    kw = dict(batch_size=3, layerwise=True, checkpoint_dir=str(tmp_path), **ONE_BUCKET)
    with pytest.raises(DeviceMemoryError) as err:
        scan(model, EXAMPLES, "harm", memory_limit=4096, **kw)
    assert not any(tmp_path.iterdir())  # nothing started
    needed = int(re.search(r"needs ([\d,]+) B", str(err.value)).group(1).replace(",", ""))
    with pytest.raises(DeviceMemoryError):
        scan(model, EXAMPLES, "harm", memory_limit=needed - 1, **kw)
    _assert_close(flatten(scan(model, EXAMPLES, "harm", memory_limit=needed, **kw).scores), ref["harm"])


def test_scan_programs_take_cublas_gemms_on_gpus(tiny, monkeypatch):
    """The scan programs' XLA options: cuBLAS GEMMs on GPUs only by default, settable by
    $HARMJAX_SCAN_TRITON_GEMM; with the option forced on, both step kinds compile on this
    backend (XLA knows the option) and still equal PyTorch autograd."""
    from harmjax.attribution.core import TRITON_GEMM_ENV, compiler_options

    _, path, ref = tiny
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    monkeypatch.delenv(TRITON_GEMM_ENV, raising=False)
    assert compiler_options(model.mesh) == ()  # CPU: XLA's defaults
    monkeypatch.setenv(TRITON_GEMM_ENV, "1")
    assert compiler_options(model.mesh) == ()
    monkeypatch.setenv(TRITON_GEMM_ENV, "yes")
    with pytest.raises(ValueError, match=TRITON_GEMM_ENV):
        compiler_options(model.mesh)
    monkeypatch.setenv(TRITON_GEMM_ENV, "0")
    assert compiler_options(model.mesh) == (("xla_gpu_enable_triton_gemm", False),)
    for layerwise in (False, True):
        ours = scan(model, EXAMPLES, "harm", batch_size=3, layerwise=layerwise, **ONE_BUCKET).scores
        _assert_close(flatten(ours), ref["harm"])


def test_both_step_programs_share_one_interface_and_one_cache(tiny):
    """`jit_accumulate` gives one `AccumulateStep` per implementation, reuses it while the
    settings stay the same, and builds a new one after `clear_step_cache` (the tests' way to
    drop steps compiled under another kernel setting)."""
    from harmjax.attribution.core import AccumulateStep
    from harmjax.attribution.step import clear_step_cache

    _, path, _ = tiny
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    c, mesh = model.config, model.mesh
    names = names_for(c, None)
    whole, per_block = (jit_accumulate(c, mesh, names, "harm", layerwise=lw) for lw in (False, True))
    assert isinstance(whole, AccumulateStep) and isinstance(per_block, AccumulateStep)
    assert type(whole) is not type(per_block)
    assert jit_accumulate(c, mesh, names, "harm") is whole
    clear_step_cache()
    assert jit_accumulate(c, mesh, names, "harm") is not whole
