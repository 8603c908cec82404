"""Gradients through the decoder equal PyTorch autograd (with and without rematerialisation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import harmjax
from harmjax.model.loss import mean_nll_per_example
from harmjax.sharding import MeshConfig, make_mesh
from harmjax.tree import flatten
from tests.hf_reference import left_padded_batch, save_tiny, tiny_hf_model


def _torch_grads(hf_model, ids, mask, positions, loss_mask):
    hf_model.zero_grad()
    logits = hf_model(
        torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
    ).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, torch.tensor(ids[:, 1:])[..., None])[..., 0]
    weights = torch.tensor(loss_mask[:, 1:], dtype=torch.float32)
    per_example = (nll * weights).sum(-1) / weights.sum(-1).clamp(min=1)
    per_example.sum().backward()
    return {n: p.grad.numpy() for n, p in hf_model.named_parameters()}


@pytest.mark.parametrize("family,remat", [("llama", False), ("gemma2", True), ("olmo3", True)])
def test_grads_match_torch_autograd(family, remat, tmp_path):
    hf_model = tiny_hf_model(family)
    model = harmjax.load(save_tiny(hf_model, tmp_path), mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    ids, mask, positions = left_padded_batch()
    loss_mask = mask.copy()
    # Score only the last 3 tokens, as a response-only loss does; each is predicted from a
    # real token (predicting a sequence's first token from padding is meaningless).
    loss_mask[:, :-3] = 0

    def loss(params):
        logits = harmjax.forward(params, model.config, jnp.asarray(ids), jnp.asarray(mask), remat=remat)
        return mean_nll_per_example(logits, jnp.asarray(ids), jnp.asarray(loss_mask)).sum()

    grads = flatten(jax.jit(jax.grad(loss))(model.params))
    ref = _torch_grads(hf_model, ids, mask, positions, loss_mask)
    if model.config.tie_word_embeddings:
        ref.pop("lm_head.weight", None)
    assert grads.keys() == ref.keys()
    for name, g in grads.items():
        np.testing.assert_allclose(np.asarray(g), ref[name], rtol=1e-4, atol=1e-5 * np.abs(ref[name]).max() + 1e-9, err_msg=name)
