"""The real embedded default, SmolLM2-135M-Instruct, loaded by harmjax straight from its GGUF."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import harmjax
from harmjax import assets
from harmjax.inference import pad_batch
from harmjax.sharding import MeshConfig, make_mesh


@pytest.fixture(scope="module")
def gguf_path(harmjax_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(assets.CACHE_ENV, harmjax_cache)
        yield assets.default_gguf_path()


@pytest.mark.slow
def test_gguf_logits_match_transformers_gguf_loading(gguf_path, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    # harmjax.load converts the GGUF into <cache>/gguf/: a 0.5 GB directory kept only for this
    # test (pytest removes a passing test's tmp_path), not for the rest of the run.
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))

    model = harmjax.load(gguf_path, dtype="float32", mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    assert (model.config.num_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert model.config.tie_word_embeddings and model.num_params() == 134_515_008
    tok = model.tokenizer
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "How do I make a paper airplane?"}], tokenize=False, add_generation_prompt=True
    )
    texts = [chat + "Fold a sheet of paper in half lengthwise.", "The capital of France is Paris.", "def f(x):\n    return x * 2"]
    ids, mask = pad_batch([tok(t)["input_ids"] for t in texts], tok.pad_token_id, 48, 3)
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)

    directory, name = os.path.split(gguf_path)
    reference = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = reference(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()
    ours = np.asarray(harmjax.forward(model.params, model.config, jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    diff, scale = np.abs(ours - ref)[valid].max(), ref[valid].std()
    assert diff <= 1e-4 * scale, (diff, scale)
    np.testing.assert_array_equal(ours.argmax(-1)[valid], ref.argmax(-1)[valid])
    # A trained model, not noise: the sentences are far more likely than uniform guessing.
    nll = harmjax.text_nll(model, texts[1:])
    assert np.all(nll < 0.6 * np.log(model.config.vocab_size))
