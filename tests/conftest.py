"""Test session setup: 8 fake CPU devices, so sharded code paths run on any machine."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Must happen before any backend is initialised. 8 devices lets the same test compare a
# 1-device run with an (fsdp x tensor) mesh run.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def harmjax_cache(tmp_path_factory) -> str:
    """One $HARMJAX_CACHE for the whole test run: the environment's when set (so CI can keep
    downloads between runs), else one directory shared by every xdist worker.

    The embedded model's conversion is 0.7 GB; one copy per worker (and one more in $HOME)
    filled a small CI disk. harmjax.assets takes file locks in the cache, so workers can fill
    it concurrently: the first converts, the others wait and reuse.
    """
    from harmjax import assets

    if os.environ.get(assets.CACHE_ENV):
        return os.environ[assets.CACHE_ENV]
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = shared / "harmjax_cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture
def one_torch_thread():
    """PyTorch on one thread for the test: its threads compete with XLA's on few cores, and
    the CPU references (generate, autograd) run ~10x slower otherwise."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The fused |grad| kernel in Pallas' interpreter (tests/test_abs_kernel.py, test_layerwise.py):
# tiles that divide the tiny models' 32-, 64- and 96-wide matrices.
SMALL_KERNEL_TILES = "16,16,8,4,1"


@pytest.fixture
def interpret(monkeypatch):
    """The fused |grad| kernel on, in Pallas' interpreter, with no scan step left from another setting."""
    from harmjax.attribution.step import clear_step_cache

    monkeypatch.setenv("HARMJAX_ABS_KERNEL", "interpret")
    monkeypatch.setenv("HARMJAX_ABS_KERNEL_CONFIG", SMALL_KERNEL_TILES)
    clear_step_cache()
    yield
    clear_step_cache()


@pytest.fixture
def kernel_calls(monkeypatch):
    """(x shape, g shape) of every traced call of the fused kernel's per-device function."""
    from harmjax.attribution import abs_kernel

    calls = []
    real = abs_kernel.local_abs_grad_sum
    monkeypatch.setattr(abs_kernel, "local_abs_grad_sum",
                        lambda *a, **k: calls.append((a[0].shape, a[1].shape)) or real(*a, **k))
    return calls
