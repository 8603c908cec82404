"""HF -> harmjax -> HF round trip, sharded safetensors, and the orbax params checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import harmjax
from harmjax import checkpoint
from harmjax.io.safetensors_io import INDEX_FILE, checkpoint_files
from harmjax.sharding import MeshConfig
from tests.hf_reference import left_padded_batch, save_tiny, tiny_hf_model, torch_logits


def _state_dict(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "olmo2", "phi3"])
def test_round_trip_gives_identical_tensors(family, tmp_path):
    hf_model = tiny_hf_model(family)
    src = save_tiny(hf_model, tmp_path / "src")
    model = harmjax.load(src, dtype="float32")
    out = harmjax.save_hf(model, str(tmp_path / "out"))

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ref, back = _state_dict(hf_model), _state_dict(reloaded)
    assert ref.keys() == back.keys()
    for name in ref:
        np.testing.assert_array_equal(back[name], ref[name], err_msg=name)
    # The file itself holds exactly the source tensors (tied heads are not duplicated).
    on_disk = load_file(f"{out}/model.safetensors")
    for name, value in on_disk.items():
        np.testing.assert_array_equal(value, ref[name], err_msg=name)
    ids, mask, pos = left_padded_batch()
    np.testing.assert_array_equal(torch_logits(reloaded, ids, mask, pos), torch_logits(hf_model, ids, mask, pos))


def test_sharded_safetensors_load_and_export(tmp_path):
    """A checkpoint split into several shards with an index loads like a single file."""
    hf_model = tiny_hf_model("llama")
    src = save_tiny(hf_model, tmp_path / "src", max_shard_size="50KB")
    assert (tmp_path / "src" / INDEX_FILE).exists()
    model = harmjax.load(src, mesh=MeshConfig(data=1, fsdp=2, tensor=4))
    ids, mask, pos = left_padded_batch()
    ours = np.asarray(harmjax.forward(model.params, model.config, jnp.asarray(ids), jnp.asarray(mask)))
    ref = torch_logits(hf_model, ids, mask, pos)
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4 * ref.std()

    out = harmjax.io.hf.save_hf(
        model.params, model.config, model.hf_config, str(tmp_path / "out"), max_shard_bytes=60_000
    )
    assert len(set(checkpoint_files(out).values())) > 1
    back = _state_dict(transformers.AutoModelForCausalLM.from_pretrained(out))
    for name, value in _state_dict(hf_model).items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_bfloat16_export_loads_in_transformers(tmp_path):
    hf_model = tiny_hf_model("qwen3")
    model = harmjax.load(save_tiny(hf_model, tmp_path / "src"), dtype="bfloat16")
    out = harmjax.save_hf(model, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, value in hf_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value.to(torch.bfloat16)), name


def test_orbax_params_checkpoint_restores_sharded(tmp_path):
    hf_model = tiny_hf_model("mistral")
    model = harmjax.load(save_tiny(hf_model, tmp_path / "src"), mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    path = checkpoint.save_tree(str(tmp_path / "ckpt"), model.params, {"model_type": "mistral"})
    target = checkpoint.abstract_params(model.config, model.mesh, jnp.float32)
    restored = checkpoint.restore_tree(path, target)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(restored)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert checkpoint.read_metadata(path) == {"model_type": "mistral"}


def test_save_orbax_then_load_on_another_mesh(tmp_path):
    hf_model = tiny_hf_model("gemma")
    model = harmjax.load(save_tiny(hf_model, tmp_path / "src"), mesh=MeshConfig(data=-1))
    out = harmjax.save_orbax(model, str(tmp_path / "orbax"))
    again = harmjax.load(out, mesh=MeshConfig(data=1, fsdp=4, tensor=2))
    assert again.config == model.config
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = again.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"]
    assert not q.sharding.is_fully_replicated


def test_orbax_directory_keeps_the_params_dtype(tmp_path):
    model = harmjax.load(save_tiny(tiny_hf_model("llama"), tmp_path / "src"), dtype="bfloat16")
    again = harmjax.load(harmjax.save_orbax(model, str(tmp_path / "orbax")))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(again.params))
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
