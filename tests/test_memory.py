"""Device-memory preflight (`harmjax.memory`): a scan or fine-tuning step that cannot fit
fails before its first batch with one line naming the bytes needed, the bytes available and
the knobs, at exactly the boundary XLA's estimate gives, and leaves finished work in place."""

import re

import jax
import numpy as np
import pytest

import harmjax
from harmjax.data import Example
from harmjax.errors import DeviceMemoryError
from harmjax.memory import LIMIT_ENV, available_bytes, program_bytes
from harmjax.sharding import MeshConfig, make_mesh
from harmjax.train import LoraConfig, TrainConfig, finetune
from tests.hf_reference import save_tiny_with_tokenizer, tiny_hf_model

EXAMPLES = [{"prompt": f"how to pick lock {i}", "response": "sure here is step one and step two " * (1 + i % 3)}
            for i in range(8)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = save_tiny_with_tokenizer(tiny_hf_model("llama", seed=3, num_hidden_layers=2), tmp_path_factory.mktemp("m"))
    return harmjax.load(d, dtype="float32", mesh=make_mesh(MeshConfig(data=1, fsdp=2, tensor=1), jax.devices()[:2]))


def _needed(message):
    return int(re.search(r"needs ([\d,]+) B", message).group(1).replace(",", ""))


def test_scan_preflight_names_the_numbers_and_keeps_the_checkpoint(model, tmp_path):
    ckpt = tmp_path / "ckpt"
    partial = harmjax.scan(model, EXAMPLES, "harm", batch_size=2, checkpoint_dir=str(ckpt), stop_after=1,
                           progress=False)
    assert partial.resumed_from == 0
    state = ckpt / "state"
    stamps = {p: p.stat().st_mtime_ns for p in state.rglob("*") if p.is_file()}

    with pytest.raises(DeviceMemoryError) as err:
        harmjax.scan(model, EXAMPLES, "harm", batch_size=2, checkpoint_dir=str(ckpt), memory_limit=4096, progress=False)
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("4,096 B", "available", "batch_size=2", "remat=False", "'fsdp': 2", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        assert part in msg, part
    needed = _needed(msg)
    # More than the accumulators alone (float32, half of them per device on fsdp=2).
    acc_bytes = 4 * sum(x.size for x in jax.tree.leaves(model.params["model"]["layers"])) // 2
    assert needed > acc_bytes // 2
    # The boundary: exactly `needed` bytes fit, one byte less does not.
    with pytest.raises(DeviceMemoryError):
        harmjax.scan(model, EXAMPLES, "harm", batch_size=2, checkpoint_dir=str(ckpt), memory_limit=needed - 1,
                     progress=False)
    assert {p: p.stat().st_mtime_ns for p in state.rglob("*") if p.is_file()} == stamps  # untouched
    done = harmjax.scan(model, EXAMPLES, "harm", batch_size=2, checkpoint_dir=str(ckpt), memory_limit=needed,
                        progress=False)
    assert done.resumed_from == 1
    whole = harmjax.scan(model, EXAMPLES, "harm", batch_size=2, progress=False)
    for a, b in zip(jax.tree.leaves(done.scores), jax.tree.leaves(whole.scores)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_env_limit_and_available_bytes(monkeypatch):
    device = jax.devices()[0]
    assert available_bytes(device, 0) is None  # CPU: no statistics, no limit: no check
    monkeypatch.setenv(LIMIT_ENV, "5e6")
    assert available_bytes(device, 123)[0] == 5_000_000
    monkeypatch.setenv(LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match=LIMIT_ENV):
        available_bytes(device, 0)


def test_program_bytes_counts_donation():
    x = jax.ShapeDtypeStruct((256, 256), np.float32)
    plain = jax.jit(lambda a: a * 2).lower(x).compile()
    donated = jax.jit(lambda a: a * 2, donate_argnums=0).lower(x).compile()
    assert program_bytes(plain) >= 2 * 256 * 256 * 4
    assert program_bytes(donated) <= program_bytes(plain) - 256 * 256 * 4


def test_finetune_preflight_fails_before_the_first_step_and_keeps_checkpoints(model, tmp_path):
    examples = [Example(e["prompt"], e["response"], id=str(i)) for i, e in enumerate(EXAMPLES)]
    cfg = TrainConfig(lr=1e-2, batch_size=4, micro_batch_size=2, epochs=2, max_length=32, val_fraction=0.0,
                      checkpoint_every=1, seed=1)
    lora = LoraConfig(r=2, alpha=4.0)
    out = tmp_path / "ft"
    first = finetune(model, examples, cfg, lora=lora, output_dir=str(out), progress=False, stop_after=1)
    assert first.steps == 1
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(DeviceMemoryError) as err:
        finetune(model, examples, cfg, lora=lora, output_dir=str(out), progress=False, memory_limit=4096)
    msg = str(err.value)
    assert "train step" in msg and "micro_batch_size=2" in msg and "4,096 B" in msg
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    resumed = finetune(model, examples, cfg, lora=lora, output_dir=str(out), progress=False,
                       memory_limit=_needed(msg))
    assert resumed.resumed_from == 1 and resumed.steps == 4


def test_refusal_says_where_the_memory_in_use_goes(monkeypatch):
    """With device statistics (faked here; CPUs have none), the refusal splits the memory in
    use into the program's arguments, the other live arrays and the rest, so a surprise (e.g.
    3 GiB in use beyond the weights after a restore) can be traced."""
    from harmjax import memory

    device = jax.devices()[0]
    args = jax.device_put(np.zeros((1024, 256), np.float32), device)  # 1 MiB: the program's argument
    other = jax.device_put(np.zeros((2048, 256), np.float32), device)  # 2 MiB held elsewhere
    monkeypatch.setattr(memory, "_stats", lambda d: {"bytes_in_use": 8 << 20, "bytes_limit": 10 << 20})
    with pytest.raises(DeviceMemoryError) as err:
        memory.check_fits(9 << 20, "a step", args, [device], "batch_size=1")
    msg = str(err.value)
    assert "available [limit 10.0 MiB, in use 8.0 MiB, of which arguments 1.0 MiB, other live arrays" in msg, msg
    live = float(re.search(r"other live arrays ([\d.]+) MiB", msg).group(1))
    assert live >= 2.0  # at least `other`; the rest of the process's live arrays may add to it
    del other
