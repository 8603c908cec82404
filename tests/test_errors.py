"""Every bad input gives an error that names the problem."""

import json
import os
import shutil

import pytest

import harmjax
from harmjax.errors import (
    CheckpointError,
    HubUnavailableError,
    MissingFileError,
    UnsupportedArchitectureError,
    UnsupportedDtypeError,
)
from tests.hf_reference import save_tiny, tiny_hf_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tiny_hf_model("llama"), tmp_path_factory.mktemp("tiny"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_directory(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(MissingFileError, match="nope"):
        harmjax.load(missing)


def test_config_without_safetensors(tiny_dir, tmp_path):
    d = tmp_path / "cfg_only"
    d.mkdir()
    shutil.copy(os.path.join(tiny_dir, "config.json"), d)
    with pytest.raises(MissingFileError, match="model.safetensors"):
        harmjax.load(str(d))


def test_directory_without_config(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "no_cfg")
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(MissingFileError, match="config.json"):
        harmjax.load(d)


def test_unsupported_architecture_names_it_and_lists_supported(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "gpt2")
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["model_type"], cfg["architectures"] = "gpt_neox", ["GPTNeoXForCausalLM"]
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(UnsupportedArchitectureError) as err:
        harmjax.load(d)
    assert "gpt_neox" in str(err.value)
    for family in harmjax.SUPPORTED_MODEL_TYPES:
        assert family in str(err.value)


def test_truncated_safetensors(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "trunc")
    path = os.path.join(d, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        harmjax.load(d)


@pytest.mark.parametrize("dtype", ["int8", "float64", "fp8"])
def test_unsupported_dtype(tiny_dir, dtype):
    with pytest.raises(UnsupportedDtypeError, match="bfloat16"):
        harmjax.load(tiny_dir, dtype=dtype)


def test_tensor_shape_mismatch_is_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "shape")
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 128
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match="mlp.gate_proj.weight has shape"):
        harmjax.load(d)


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(HubUnavailableError, match="no-such-org/no-such-model"):
        harmjax.load("no-such-org/no-such-model")


def test_hub_id_resolves_from_local_hub_cache_when_offline(tiny_dir, monkeypatch, tmp_path):
    """The hub code path, exercised on local files: a hub id found in the hub cache loads."""
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / revision
    shutil.copytree(tiny_dir, snapshot)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    model = harmjax.load("tiny-org/tiny-llama")
    assert model.source_dir == str(snapshot)
    assert model.config.model_type == "llama"
