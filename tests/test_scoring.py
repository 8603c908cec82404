"""The shared scoring core `harmjax.inference.token_logprobs` against PyTorch: gathered
log-probabilities (one or several tokens per position) and in-jit sums and means, on a
left-padded batch of a Gemma-2 model (logit soft-cap, sliding window), sharded over 2 devices."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import harmjax
from harmjax.inference import token_logprobs
from harmjax.sharding import MeshConfig, make_mesh
from tests.hf_reference import VOCAB, left_padded_batch, save_tiny_with_tokenizer, tiny_hf_model, torch_logits


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf = tiny_hf_model("gemma2", seed=11)
    directory = save_tiny_with_tokenizer(hf, tmp_path_factory.mktemp("scoring"))
    model = harmjax.load(directory, dtype="float32", mesh=make_mesh(MeshConfig(data=2), jax.devices()[:2]))
    ids, mask, positions = left_padded_batch(seed=5, batch=4, length=16)
    ref = torch.log_softmax(torch.tensor(torch_logits(hf, ids, mask, positions)).double(), -1).numpy()
    return model, ids.astype(np.int32), mask.astype(np.int32), ref, hf


def _real_positions(mask: np.ndarray, k: int, rng) -> np.ndarray:
    """(batch, k) positions drawn among each row's real (unpadded) tokens."""
    return np.stack([rng.choice(np.flatnonzero(row), size=k) for row in mask]).astype(np.int32)


def test_gathered_logprobs_equal_pytorch(setup):
    model, ids, mask, ref, _ = setup
    rng = np.random.default_rng(0)
    pos = _real_positions(mask, 5, rng)
    rows = np.arange(len(ids))[:, None]

    tokens = rng.integers(0, VOCAB, pos.shape).astype(np.int32)
    got = token_logprobs(model, ids, mask, pos, tokens)
    assert got.shape == (4, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref[rows, pos, tokens], atol=1e-4)

    several = rng.integers(0, VOCAB, pos.shape + (3,)).astype(np.int32)
    got3 = token_logprobs(model, ids, mask, pos, several)
    assert got3.shape == (4, 5, 3)
    np.testing.assert_allclose(got3, ref[rows[..., None], pos[..., None], several], atol=1e-4)


def test_sum_and_mean_equal_pytorch(setup):
    model, ids, mask, ref, _ = setup
    rng = np.random.default_rng(1)
    pos = _real_positions(mask, 6, rng)
    tokens = rng.integers(0, VOCAB, pos.shape).astype(np.int32)
    weights = (rng.random(pos.shape) < 0.6).astype(np.float32)
    weights[3] = 0.0  # a row with nothing to score: sum 0, mean 0
    picked = ref[np.arange(len(ids))[:, None], pos, tokens] * weights
    want_sum = picked.sum(-1)
    want_mean = want_sum / np.maximum(weights.sum(-1), 1.0)
    np.testing.assert_allclose(token_logprobs(model, ids, mask, pos, tokens, weights, reduce="sum"), want_sum, atol=1e-4)
    np.testing.assert_allclose(token_logprobs(model, ids, mask, pos, tokens, weights, reduce="mean"), want_mean, atol=1e-4)
    with pytest.raises(ValueError, match="weights"):
        token_logprobs(model, ids, mask, pos, tokens, reduce="sum")
    with pytest.raises(ValueError, match="reduce"):
        token_logprobs(model, ids, mask, pos, tokens, weights, reduce="max")


def test_opening_logprobs_equal_pytorch(setup):
    """Openings that share a stem pass ("I'm sorry", "I cannot", "I") and ones that do not
    ("Sure"), in a batch whose prompts differ in length: log p(opening | prompt) equals the
    sum of PyTorch log-softmax terms of one unpadded forward per (prompt, opening)."""
    from harmjax.data.records import Example
    from harmjax.evaluate.openings import opening_logprobs
    from harmjax.generate.prompts import prefix_token_ids, prompt_token_ids

    model, hf = setup[0], setup[-1]
    prompts = [Example(prompt=p, id=str(i)) for i, p in enumerate(["Hi?", "Tell me a story about a cat.", "Go"])]
    openings = ["I'm sorry", "I cannot", "I", "Sure"]
    got = opening_logprobs(model, None, prompts, openings, batch_size=2)
    assert got.shape == (3, 4)
    for i, e in enumerate(prompts):
        p = prompt_token_ids(model.tokenizer, e.prompt)
        for j, o in enumerate(openings):
            o_ids = prefix_token_ids(model.tokenizer, o)
            with torch.no_grad():
                logits = hf(torch.tensor([p + o_ids])).logits[0].double()
            lp = torch.log_softmax(logits, -1).numpy()
            want = sum(lp[len(p) - 1 + t, tok] for t, tok in enumerate(o_ids))
            assert got[i, j] == pytest.approx(want, abs=1e-4), (e.prompt, o)
