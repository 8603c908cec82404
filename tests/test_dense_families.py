"""The 2026 dense families beyond the shared parity/generation/round-trip parametrisations:
Phi-3's longrope long factors, attribution on Phi-3's fused projections and
through SmolLM3's NoPE layers against PyTorch autograd, LoRA's refusal of fused projections,
and a Gemma-3 multimodal checkpoint read (and exported) as its text tower."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import harmjax
from harmjax.attribution import scan, scored_names
from harmjax.errors import UnsupportedArchitectureError
from harmjax.sharding import MeshConfig, make_mesh
from harmjax.train.lora import LoraConfig, adapted_weight_names
from harmjax.tree import flatten
from tests.hf_reference import _COMMON, left_padded_batch, save_tiny, save_tiny_with_tokenizer, tiny_hf_model, torch_logits
from tests.test_attribution import EXAMPLES, ONE_BUCKET, _assert_close, _torch_scores
from tests.test_parity import assert_logits_match


def _mesh():
    return make_mesh(MeshConfig(data=1), jax.devices()[:1])


def _logits(model, ids, mask):
    return np.asarray(harmjax.forward(model.params, model.config, jnp.asarray(ids), jnp.asarray(mask)))


def test_phi3_longrope_long_factors_match_transformers(tmp_path):
    """With original_max_position_embeddings=8 the 13-token batch runs on the long factors
    (the shared parity test, at 16, on the short ones), and the factor set matters."""
    ids, mask, positions = left_padded_batch()
    hf_model = tiny_hf_model("phi3", original_max_position_embeddings=8)
    model = harmjax.load(save_tiny(hf_model, tmp_path), dtype="float32", mesh=_mesh())
    ours = _logits(model, ids, mask)
    assert_logits_match(ours, torch_logits(hf_model, ids, mask, positions), mask)
    rope = dataclasses.replace(model.config.rope, original_max_position_embeddings=16)
    short = dataclasses.replace(model.config, rope=rope, rope_local=rope)
    other = np.asarray(harmjax.forward(model.params, short, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(ours - other)[mask.astype(bool)].max() > 1e-2


@pytest.mark.parametrize("family,layerwise", [("phi3", False), ("smollm3", True)])
def test_signed_snip_matches_torch_autograd(family, layerwise, tmp_path):
    """Signed SNIP scores Phi-3's own qkv_proj/gate_up_proj (the default scope) and passes
    SmolLM3's NoPE layer through the per-block programs, equal to PyTorch autograd. (Phi-3's
    longrope switch is set out of reach: it picks factors per batch, the reference per example.)"""
    over = {"original_max_position_embeddings": 256} if family == "phi3" else {}
    hf_model = tiny_hf_model(family, seed=3, **over)
    model = harmjax.load(save_tiny_with_tokenizer(hf_model, tmp_path), mesh=_mesh())
    if family == "phi3":
        expected = [f"model.layers.{i}.{n}.weight" for i in range(3)
                    for n in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
        assert scored_names(model.config) == expected
    examples = EXAMPLES[:2]
    ref = _torch_scores(hf_model, examples)["harm"]
    ours = flatten(scan(model, examples, "harm", batch_size=3, layerwise=layerwise, **ONE_BUCKET).scores)
    _assert_close(ours, ref)


def test_lora_refuses_fused_projections(tmp_path):
    model = harmjax.load(save_tiny(tiny_hf_model("phi3"), tmp_path), mesh=_mesh())
    with pytest.raises(UnsupportedArchitectureError, match="fused qkv_proj/gate_up_proj"):
        adapted_weight_names(model.config, LoraConfig(r=2))


def _tiny_gemma3_multimodal():
    """A tiny Gemma3ForConditionalGeneration (vision tower of one layer), norms perturbed."""
    torch.manual_seed(0)
    text = {k: v for k, v in _COMMON.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
    text.update(head_dim=32, sliding_window=5, query_pre_attn_scalar=24, tie_word_embeddings=True,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    config._attn_implementation = "eager"
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def test_gemma3_multimodal_text_tower(tmp_path):
    """The text tower of a Gemma-3 multimodal checkpoint loads under text-only names, gives
    the multimodal model's text logits, and exports as a Gemma3ForCausalLM holding exactly
    the file's language-model tensors."""
    hf_model = _tiny_gemma3_multimodal()
    src = save_tiny(hf_model, tmp_path / "src")
    stored = load_file(f"{src}/model.safetensors")
    assert any(n.startswith("vision_tower.") for n in stored)  # really a multimodal file
    model = harmjax.load(src, dtype="float32", mesh=_mesh())
    assert model.config.model_type == "gemma3_text"
    assert "model.layers.0.self_attn.q_norm.weight" in flatten(model.params)

    ids, mask, positions = left_padded_batch()
    assert_logits_match(_logits(model, ids, mask), torch_logits(hf_model, ids, mask, positions), mask)

    out = harmjax.save_hf(model, str(tmp_path / "out"))
    exported = load_file(f"{out}/model.safetensors")
    text = {n.replace("language_model.", "", 1): v for n, v in stored.items() if n.startswith("language_model.")}
    assert exported.keys() == text.keys()
    for name, value in exported.items():
        np.testing.assert_array_equal(value, text[name], err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == "Gemma3ForCausalLM"
    np.testing.assert_allclose(torch_logits(reloaded, ids, mask, positions),
                               torch_logits(hf_model, ids, mask, positions), rtol=1e-5, atol=1e-5)
