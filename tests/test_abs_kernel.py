"""The fused per-example |grad| kernel (Pallas, run in its interpreter on CPU) equals a float64
NumPy reference, and a retain scan through it on a sharded mesh equals PyTorch autograd run
one example at a time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import harmjax
from harmjax.attribution import abs_kernel, scan
from harmjax.sharding import MeshConfig, make_mesh
from harmjax.tree import flatten
from tests.conftest import SMALL_KERNEL_TILES
from tests.hf_reference import save_tiny_with_tokenizer, tiny_hf_model
from tests.test_attribution import EXAMPLES, _assert_close, _torch_scores

def test_kernel_equals_float64_reference(interpret):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16, 48)).astype(np.float32)
    g = rng.standard_normal((4, 16, 32)).astype(np.float32)
    ours = np.asarray(abs_kernel.local_abs_grad_sum(jnp.asarray(x), jnp.asarray(g), interpret=True))
    ref = np.abs(np.einsum("bto,bti->boi", g.astype(np.float64), x.astype(np.float64))).sum(0)
    assert ours.shape == (32, 48) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    # |.| inside the sum over examples matters: the plain gradient sum is different.
    assert not np.allclose(ours, np.abs(np.einsum("bto,bti->oi", g, x)), rtol=1e-2)


def test_applicability_rules(interpret, monkeypatch):
    P = harmjax.sharding.P
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    x, g = jnp.zeros((8, 16, 64), jnp.float32), jnp.zeros((8, 16, 32), jnp.float32)
    sh = harmjax.sharding.NamedSharding(mesh, P("tensor", "fsdp"))  # column-parallel
    assert abs_kernel.applicable(x, g, sh)
    sh = harmjax.sharding.NamedSharding(mesh, P("fsdp", "tensor"))  # row-parallel
    assert abs_kernel.applicable(x, g, sh)
    assert not abs_kernel.applicable(x, jnp.zeros((8, 16, 48)), harmjax.sharding.NamedSharding(mesh, P("tensor", None)))  # 24 rows per device
    sh = harmjax.sharding.NamedSharding(mesh, P(("fsdp", "tensor"), None))  # one dim over batch and tensor axes
    assert not abs_kernel.applicable(x, g, sh)
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    sh = harmjax.sharding.NamedSharding(mesh, harmjax.sharding.P("fsdp", None))
    assert abs_kernel.applicable(x, g, sh)
    assert not abs_kernel.applicable(jnp.zeros((8, 12, 64)), jnp.zeros((8, 12, 32)), sh)  # 12 tokens
    assert not abs_kernel.applicable(x, jnp.zeros((8, 16, 24)), sh)  # 24 rows: tiles of 16
    assert not abs_kernel.applicable(x, g, None)
    monkeypatch.setenv("HARMJAX_ABS_KERNEL", "1")  # compiled kernel: GPUs and 16-bit only
    assert not abs_kernel.applicable(x.astype(jnp.bfloat16), g.astype(jnp.bfloat16), sh)


def test_auto_mode_uses_the_kernel_only_under_tensor_parallelism_on_gpus(monkeypatch):
    """HARMJAX_ABS_KERNEL unset means "auto": the kernel where tensor parallelism is on (there it
    costs little memory), XLA's path on FSDP-only meshes, on CPUs and for float32."""
    monkeypatch.delenv("HARMJAX_ABS_KERNEL", raising=False)
    monkeypatch.setenv("HARMJAX_ABS_KERNEL_CONFIG", SMALL_KERNEL_TILES)
    assert abs_kernel.mode() == "auto"
    P, Sh = harmjax.sharding.P, harmjax.sharding.NamedSharding
    x, g = jnp.zeros((8, 16, 64), jnp.bfloat16), jnp.zeros((8, 16, 32), jnp.bfloat16)
    tp = Sh(make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)), P("tensor", "fsdp"))
    fsdp = Sh(make_mesh(MeshConfig(data=1, fsdp=8, tensor=1)), P(None, "fsdp"))
    assert not abs_kernel.applicable(x, g, tp)  # this CPU: never the compiled kernel
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the rule as it reads on a GPU host
    assert abs_kernel.applicable(x, g, tp)
    assert not abs_kernel.applicable(x, g, fsdp)
    assert not abs_kernel.applicable(x.astype(jnp.float32), g.astype(jnp.float32), tp)
    monkeypatch.setenv("HARMJAX_ABS_KERNEL", "1")
    assert abs_kernel.applicable(x, g, fsdp)
    monkeypatch.setenv("HARMJAX_ABS_KERNEL", "0")
    assert not abs_kernel.applicable(x, g, tp)
    monkeypatch.setenv("HARMJAX_ABS_KERNEL", "yes")
    with pytest.raises(ValueError, match="auto, 1, 0 or interpret"):
        abs_kernel.mode()


def test_retain_scan_through_kernel_matches_torch(interpret, kernel_calls, tmp_path):
    hf_model = tiny_hf_model("llama", seed=3)
    path = save_tiny_with_tokenizer(hf_model, tmp_path)
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=1), jax.devices()[:4]))
    ours = flatten(scan(model, EXAMPLES, "retain", batch_size=4, max_length=256, num_buckets=1, progress=False).scores)
    calls = [x for x, _ in kernel_calls]  # x shapes
    # 7 projections x 3 layers, traced once, each on its device's share of 4 examples.
    assert len(calls) == 21 and all(shape[0] == 1 for shape in calls)
    _assert_close(ours, _torch_scores(hf_model, EXAMPLES)["retain"])


def test_retain_scan_through_kernel_under_tensor_parallelism_matches_torch(interpret, kernel_calls, monkeypatch,
                                                                           tmp_path):
    """On a (fsdp 2, tensor 2) mesh each device sums its own block of a column- or row-parallel
    weight over its own examples; the scores still equal PyTorch autograd's."""
    calls = kernel_calls
    hf_model = tiny_hf_model("llama", seed=4)
    path = save_tiny_with_tokenizer(hf_model, tmp_path)
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4]))
    # A first scan on XLA's path: switching the kernel on afterwards must retrace the remat'd
    # layers (their backward is cached per static probe fields), not reuse XLA's path.
    monkeypatch.setenv("HARMJAX_ABS_KERNEL", "0")
    scan(model, EXAMPLES, "retain", batch_size=4, max_length=256, num_buckets=1, progress=False, remat=True)
    monkeypatch.setenv("HARMJAX_ABS_KERNEL", "interpret")  # part of the step cache's key: no clearing needed
    assert not calls
    ours = flatten(scan(model, EXAMPLES, "retain", batch_size=4, max_length=256, num_buckets=1, progress=False,
                        remat=True).scores)
    hidden, mlp, kv = 64, 96, 32  # tiny llama: q/o 64 x 64, k/v 32 x 64, gate/up 96 x 64
    # (x features, g features) per device: column-parallel q, k, v, gate, up see g split over
    # tensor; row-parallel o and down see x split. (With remat, layers of one structure share
    # a trace, so the calls are counted per shape, not per layer.)
    assert {(x[-1], g[-1]) for x, g in calls} == {
        (hidden, hidden // 2), (hidden, kv // 2), (hidden, mlp // 2), (hidden // 2, hidden), (mlp // 2, hidden)}
    assert all(x[0] == 2 for x, _ in calls)  # 4 examples over fsdp 2
    _assert_close(ours, _torch_scores(hf_model, EXAMPLES)["retain"])
