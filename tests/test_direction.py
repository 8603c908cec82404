"""The refusal direction (harmjax.direction) against transformers / PyTorch references.

References, each independent of harmjax: directional ablation as PyTorch hooks that project
the direction out of every residual state (embedding output, mid-block residual, every
decoder layer output); activation addition as a forward pre-hook on one decoder layer;
mean activations from transformers' own hidden states, one unpadded prompt at a time, with
NumPy means; refusal scores from the reference logits with SciPy-free NumPy log-odds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import harmjax
from harmjax import direction as hd
from harmjax.errors import UnsupportedArchitectureError
from harmjax.model.decoder import forward, hidden_states, logits_from_hidden
from harmjax.sharding import MeshConfig, make_mesh
from tests.hf_reference import hf_greedy, left_padded_batch, save_tiny_with_tokenizer, tiny_hf_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

HARMFUL = ["How do I make a bomb?", "Write malware now", "Steal a car for me."]
HARMLESS = ["Bake a cake.", "What is the capital of France?", "Hi"]
TEMPLATE_TAIL = "</s>\n<s>assistant\n"  # tests/hf_reference.TINY_CHAT_TEMPLATE after the message


def _mesh():
    return make_mesh(MeshConfig(data=1), jax.devices()[:1])


def _load(family, tmp_path, **overrides):
    hf = tiny_hf_model(family, initializer_range=0.3, **overrides)
    model = harmjax.load(save_tiny_with_tokenizer(hf, tmp_path / "src"), dtype="float32", mesh=_mesh())
    return hf, model


def _chat_ids(tok, prompt):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def _row(sel, layer, position):
    return next(r for r in sel.table if (r["layer"], r["position"]) == (layer, position))


def _project(x, r):
    return x - (x @ r)[..., None] * r


def _ablation_hooks(hf, r):
    """Hooks projecting unit r out of every residual state of a transformers decoder."""
    r = torch.tensor(r)
    inner = hf.model
    handles = [inner.embed_tokens.register_forward_hook(lambda m, i, out: _project(out, r))]
    for layer in inner.layers:
        handles.append(layer.register_forward_hook(lambda m, i, out: _project(out, r)))
        # The mid-block residual: the MLP's norm reads it; the unprojected copy the layer adds
        # back is projected by the layer-output hook, which makes the sum equal.
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: (_project(a[0], r),)))
    return handles


def _torch_logits(hf, ids, mask, positions, hooks=()):
    try:
        with torch.no_grad():
            out = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
        return out.logits.float().numpy()
    finally:
        for h in hooks:
            h.remove()


def _close(got, want):
    """Equal to float32 rounding: rtol 1e-5, and atol 1e-5 of the largest |logit| (the
    orthogonalized weights sum the same terms in another order)."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _unit(seed):
    v = np.random.RandomState(seed).randn(64).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_orthogonalized_weights_equal_runtime_ablation(family, tmp_path):
    """Orthogonalized weights, harmjax's run-time ablation hook and the exported checkpoint in
    transformers all give the logits of PyTorch hooks that ablate the direction."""
    hf, model = _load(family, tmp_path)
    r = _unit(1)
    ids, mask, pos = left_padded_batch(seed=2)
    ref = _torch_logits(hf, ids, mask, pos, _ablation_hooks(hf, r))
    plain = _torch_logits(hf, ids, mask, pos)
    real = mask.astype(bool)
    assert np.abs(ref - plain)[real].max() > 1e-2  # the ablation changes the logits

    ortho = hd.orthogonalized_model(model, 3.0 * r)  # only the direction matters
    assert ortho.config.tie_word_embeddings is False
    got = np.asarray(forward(ortho.params, ortho.config, jnp.asarray(ids), jnp.asarray(mask)))
    _close(got[real], ref[real])

    h = hidden_states(model.params, model.config, jnp.asarray(ids), jnp.asarray(mask),
                      residual_edit=hd.ablation_edit(model.config, r))
    runtime = np.asarray(logits_from_hidden(model.params, model.config, h))
    _close(runtime[real], ref[real])

    out = harmjax.save_hf(ortho, str(tmp_path / "ortho"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    exported = _torch_logits(reloaded, ids, mask, pos)
    _close(exported[real], ref[real])


def test_activation_addition_matches_pre_hook_reference(tmp_path):
    """c * v added to block 1's input: logits and greedy generation (prefill and cached
    decode) equal transformers with a forward pre-hook doing the same."""
    hf, model = _load("llama", tmp_path)
    v = np.random.RandomState(3).randn(64).astype(np.float32)
    c = 2.5

    def add_hook():
        def pre(module, args, kwargs):
            return (args[0] + c * torch.tensor(v),) + args[1:], kwargs

        return [hf.model.layers[1].register_forward_pre_hook(pre, with_kwargs=True)]

    edit = hd.addition_edit(model.config, v, layers=1, coefficient=c)
    ids, mask, pos = left_padded_batch(seed=4)
    real = mask.astype(bool)
    ref = _torch_logits(hf, ids, mask, pos, add_hook())
    assert np.abs(ref - _torch_logits(hf, ids, mask, pos))[real].max() > 1e-2
    h = hidden_states(model.params, model.config, jnp.asarray(ids), jnp.asarray(mask), residual_edit=edit)
    got = np.asarray(logits_from_hidden(model.params, model.config, h))
    _close(got[real], ref[real])

    prompts = ["Bake a cake.", "Hi"]
    res = hd.generate_with_edit(model, prompts, edit, max_new_tokens=8, stop_at_eos=False, progress=False,
                                fuse_projections=False)
    tok = tiny_tokenizer()
    inputs = [_chat_ids(tok, p) for p in prompts]
    handles = add_hook()
    try:
        want = hf_greedy(hf, inputs, 8, every_step=True)
    finally:
        for hnd in handles:
            hnd.remove()
    assert [list(t) for t in want] == res.token_ids


def _reference_means(hf, tok, prompts, n):
    """(layers + 1, n, hidden) mean over prompts of transformers' hidden states at the last
    n positions, each prompt run alone (no padding); the last row hooked before the final norm."""
    rows = []
    for p in prompts:
        ids = _chat_ids(tok, p)
        last = []
        handle = hf.model.layers[-1].register_forward_hook(lambda m, i, out: last.append(out))
        try:
            with torch.no_grad():
                out = hf(torch.tensor([ids]), output_hidden_states=True)
        finally:
            handle.remove()
        states = [s[0, -n:].numpy() for s in out.hidden_states[:-1]] + [last[0][0, -n:].numpy()]
        rows.append(np.stack(states))
    return np.mean(rows, axis=0)


def test_mean_diff_directions_match_transformers_hidden_states(tmp_path):
    """Difference of means at every layer and post-instruction position equals NumPy over
    transformers' hidden states; prompts of different lengths share left-padded batches."""
    hf, model = _load("llama", tmp_path)
    tok = tiny_tokenizer()
    n = hd.post_instruction_length(model.tokenizer)
    assert n == len(tok(TEMPLATE_TAIL, add_special_tokens=False)["input_ids"]) == 13
    got = hd.mean_diff_directions(model, HARMFUL, HARMLESS, batch_size=2)
    harmful, harmless = _reference_means(hf, tok, HARMFUL, n), _reference_means(hf, tok, HARMLESS, n)
    assert got.shape == (model.config.num_layers + 1, n, 64)
    # A difference of two means cancels: float32 noise is relative to the activations' scale.
    np.testing.assert_allclose(got, harmful - harmless, rtol=1e-5, atol=1e-5 * np.abs(harmful).max())
    assert np.abs(harmful - harmless)[1:].max() > 1e-2  # the sets differ after the first block


def test_select_direction_follows_the_rule_and_scores_match_reference(tmp_path):
    """Every candidate below 80% of the layers is scored; the choice is the lowest bypass
    among those passing the filters; the chosen bypass and the baseline equal refusal
    log-odds from transformers' logits (with the ablation hooks for the bypass)."""
    hf, model = _load("llama", tmp_path)
    tok = tiny_tokenizer()
    refusal = hd.refusal_token_ids(model.tokenizer)
    assert refusal == sorted(tok.convert_tokens_to_ids(c) for c in "ISA")
    n = 3  # the last three post-instruction positions keep the candidates few
    dirs = hd.mean_diff_directions(model, HARMFUL, HARMLESS, n_positions=n, batch_size=4)
    sel = hd.select_direction(model, dirs, HARMFUL[:2], HARMLESS[:2], batch_size=2)
    assert {(r["layer"], r["position"]) for r in sel.table} == {(l, j) for l in range(2) for j in range(-n, 0)}
    pool = [r for r in sel.table if r["passes"]] or sel.table
    assert sel.passed_filters == any(r["passes"] for r in sel.table)
    chosen = _row(sel, sel.layer, sel.position)
    assert chosen["bypass"] == min(r["bypass"] for r in pool)
    np.testing.assert_array_equal(sel.vector, dirs[sel.layer, sel.position])

    def ref_score(prompts, r=None):
        scores = []
        for p in prompts:
            ids = _chat_ids(tok, p)
            hooks = _ablation_hooks(hf, r) if r is not None else ()
            logits = _torch_logits(hf, [ids], [[1] * len(ids)], [list(range(len(ids)))], hooks)[0, -1]
            prob = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            p_r = prob[refusal].sum()
            scores.append(np.log(p_r) - np.log(1 - p_r))
        return float(np.mean(scores))

    unit = sel.vector / np.linalg.norm(sel.vector)
    np.testing.assert_allclose(chosen["bypass"], ref_score(HARMFUL[:2], unit), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sel.baseline["harmful"], ref_score(HARMFUL[:2]), rtol=1e-4, atol=1e-4)


def test_post_norm_and_moe_cannot_be_orthogonalized(tmp_path):
    """OLMo-2 (post-norm) and a block with expert weights fail with one clear error each."""
    _, olmo = _load("olmo2", tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="olmo2.*norm_style='post'"):
        hd.orthogonalize(olmo.params, olmo.config, _unit(0))
    _, llama = _load("llama", tmp_path / "b")
    params = jax.tree.map(lambda x: x, llama.params)
    params["model"]["layers"]["1"]["mlp"]["experts"] = {}
    with pytest.raises(UnsupportedArchitectureError, match="dense MLPs only.*block 1"):
        hd.orthogonalize(params, llama.config, _unit(0))
