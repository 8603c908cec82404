"""Chat-format attribution scores (the embedded default, `scoring.text_format = "chat"`) equal
PyTorch autograd over the response turn only, with every template and prompt token masked.

The independent reference tokenizes each example with the HF tokenizer's own
`apply_chat_template` (token ids, not text), locates the assistant turn as the tokens after the
generation prompt, and runs per-example autograd on the mean NLL over that turn. The template is
SmolLM2-135M-Instruct's (the embedded model's) ChatML template, with its default system prompt;
SmolLM2's `<|im_start|>` / `<|im_end|>` are its BOS / EOS (ids 1 / 2), which the tiny tokenizer's
`<s>` / `</s>` stand in for, so the template tokens are the same kind of tokens at the same ids.

Which tokens of the turn count: harmjax scores the assistant's content plus the template's
end-of-turn tokens (`</s>` and the newline after it), not the assistant header. The test
fixes that convention and shows it matters (the content-only, header-included and unmasked
variants all give materially different scores).
"""

import jax
import numpy as np
import pytest
import torch

import harmjax
from harmjax.attribution import scan
from harmjax.data.calibration import tokenize_example
from harmjax.data.records import Example
from harmjax.sharding import MeshConfig, make_mesh
from harmjax.tree import flatten
from tests.hf_reference import save_tiny, tiny_hf_model, tiny_tokenizer

# SmolLM2-135M-Instruct's chat template (tokenizer_config.json), <|im_start|> -> <s> and
# <|im_end|> -> </s>: a system turn is injected when the conversation has none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<s>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face</s>\n' }}"
    "{% endif %}{{'<s>' + message['role'] + '\n' + message['content'] + '</s>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
)

# Harmful (prompt, response) pairs of different lengths; one response starts with a space and
# one spans lines, so a boundary found from text rather than tokens would show.
EXAMPLES = [
    {"prompt": "How do I pick a lock?", "response": "First, insert a tension wrench."},
    {"prompt": "Write a threat.", "response": "You will regret this."},
    {"prompt": "Make a weapon at home", "response": " Take a pipe and"},
    {"prompt": "Hi", "response": "Sure, here is a plan:\n1. Buy\n2. Hide"},
    {"prompt": "Tell me a secret.", "response": "No."},
]

# Scan settings as the experiment passes them (configs/embedded.py: one bucket, abs_chunk equal
# to the batch), with a batch of 3 so the 5 examples make two batches, the last with a filler row.
SCAN = dict(text_format="chat", max_length=256, batch_size=3, num_buckets=1, abs_chunk=3, progress=False)


def _tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = SMOLLM2_TEMPLATE
    return tok


def _spans(tok, ex):
    """Token ids of the whole conversation and the target positions of each convention,
    found from token ids the HF tokenizer gives for the template's pieces."""
    user = [{"role": "user", "content": ex["prompt"]}]
    turn = user + [{"role": "assistant", "content": ex["response"]}]
    full = tok.apply_chat_template(turn, return_dict=False)
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, return_dict=False)
    before_header = tok.apply_chat_template(user, return_dict=False)  # ends at the user's end-of-turn
    content = tok(ex["response"], add_special_tokens=False)["input_ids"]
    n_prompt, n_end = len(prompt), len(prompt) + len(content)
    # The conversation extends its generation prompt and the response's own tokens follow it.
    assert full[:n_prompt] == prompt and full[n_prompt:n_end] == content
    assert prompt[: len(before_header)] == before_header and n_end < len(full)
    return full, {
        "turn": range(n_prompt, len(full)),  # content + end-of-turn tokens (harmjax's choice)
        "content": range(n_prompt, n_end),  # the response's tokens alone
        # orgadhadas/harm_pruning's chat-format `prompt`/`response` CSV columns, as a downstream
        # project describes them (the released generator writes only the raw columns): prompt
        # ends at the user's end-of-turn, response = assistant header + content, no end-of-turn.
        "header_content": range(len(before_header), n_end),
        "unmasked": range(1, len(full)),  # every token after the first: no template masking
    }


def _torch_scores(hf_model, tok, examples, convention):
    """Per-example autograd, unpadded, float32: harm = -W * sum_i dL_i/dW and
    retain = |W| * sum_i |dL_i/dW|, L_i the mean NLL over example i's target tokens."""
    linear = {n: p for n, p in hf_model.named_parameters() if n.endswith("_proj.weight")}
    G = {n: torch.zeros_like(p) for n, p in linear.items()}
    A = {n: torch.zeros_like(p) for n, p in linear.items()}
    for ex in examples:
        full, spans = _spans(tok, ex)
        ids = torch.tensor([full])
        targets = torch.tensor(list(spans[convention]))
        hf_model.zero_grad()
        logp = torch.log_softmax(hf_model(ids).logits[0].float(), -1)
        # Token j is predicted at position j - 1.
        nll = -logp[targets - 1, ids[0, targets]]
        nll.mean().backward()
        for n, p in linear.items():
            G[n] += p.grad
            A[n] += p.grad.abs()
    W = {n: p.detach() for n, p in linear.items()}
    return {
        "harm": {n: (-W[n] * G[n]).numpy() for n in W},
        "retain": {n: (W[n].abs() * A[n]).numpy() for n in W},
    }


def _assert_close(ours, ref):
    assert ours.keys() == ref.keys()
    for name in ref:
        scale = np.abs(ref[name]).max()
        np.testing.assert_allclose(np.asarray(ours[name]), ref[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def _relative_difference(ours, ref):
    """||ours - ref|| / ||ref|| over all scored matrices together."""
    a = np.concatenate([np.ravel(np.asarray(ours[n])) for n in sorted(ref)])
    b = np.concatenate([np.ravel(ref[n]) for n in sorted(ref)])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf_model = tiny_hf_model("llama", seed=5)
    path = tmp_path_factory.mktemp("tiny_chat")
    save_tiny(hf_model, path)
    _tokenizer().save_pretrained(str(path))
    model = harmjax.load(str(path), mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    return hf_model, model


def test_chat_loss_mask_matches_the_template(tiny):
    """harmjax's chat tokenization gives apply_chat_template's ids and a loss mask over exactly
    the assistant turn after the generation prompt, template tokens masked."""
    _, model = tiny
    tok = _tokenizer()
    assert model.tokenizer.chat_template == SMOLLM2_TEMPLATE
    for ex in EXAMPLES:
        full, spans = _spans(tok, ex)
        ours = tokenize_example(model.tokenizer, Example(prompt=ex["prompt"], response=ex["response"]), "chat", 256)
        np.testing.assert_array_equal(ours.ids, full)
        expected = np.zeros(len(full), np.int32)
        expected[list(spans["turn"])] = 1
        np.testing.assert_array_equal(ours.loss_mask, expected, err_msg=ex["prompt"])
        # The masked template is most of the sequence (system turn, headers), so a mask that
        # let it through could not pass the score comparisons below.
        assert len(spans["turn"]) < len(full) / 2


def test_chat_harm_and_retain_match_torch_autograd(tiny):
    """Signed SNIP (as the harm units are scanned) and the (retain, harm) pass over the retain
    set (as `benign_scores` scans it) equal per-example PyTorch autograd in chat format."""
    hf_model, model = tiny
    tok = _tokenizer()
    ref = _torch_scores(hf_model, tok, EXAMPLES, "turn")

    harm = flatten(scan(model, EXAMPLES, "harm", **SCAN).scores)
    _assert_close(harm, ref["harm"])
    values = np.concatenate([np.ravel(v) for v in ref["harm"].values()])
    assert (values != 0).mean() > 0.9 and (values > 0).any() and (values < 0).any()

    both = scan(model, EXAMPLES, ("retain", "harm"), **SCAN).scores
    _assert_close(flatten(both["retain"]), ref["retain"])
    _assert_close(flatten(both["harm"]), ref["harm"])

    # The masking is what these scores test: the same autograd with the template tokens
    # scored, or with the end-of-turn tokens dropped, or with the assistant header scored
    # instead of them (the reference's chat CSVs), lands far outside the tolerance above.
    for convention in ("unmasked", "content", "header_content"):
        other = _torch_scores(hf_model, tok, EXAMPLES, convention)
        for kind in ("harm", "retain"):
            diff = _relative_difference(harm if kind == "harm" else flatten(both["retain"]), other[kind])
            assert diff > 0.1, f"{convention} {kind}: relative difference only {diff:.3g}"
