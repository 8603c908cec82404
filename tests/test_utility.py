"""Tests of harmjax.evaluate.utility: perplexity and multiple-choice log-likelihoods against
PyTorch on a tiny transformers model, the six tasks' prompt formats from native-column JSONL
files, and TriviaQA normalisation and alias matching."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
import torch

import harmjax
from harmjax.data.records import DatasetFormatError
from harmjax.errors import HubUnavailableError, MissingFileError
from harmjax.evaluate import utility
from harmjax.evaluate.utility import MCItem, TriviaItem
from harmjax.sharding import MeshConfig, make_mesh
from tests.hf_reference import save_tiny_with_tokenizer, tiny_hf_model, tiny_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen.",
    "def add(a, b):\n    return a + b\n",
]

ITEMS = [
    MCItem("Question: What is 2 + 2?\nAnswer:", ("4", "five", "22 or so"), 0, id="q0"),
    MCItem("The sky is", ("blue", "green and wide", "x"), 1, id="q1"),
    MCItem("Paris is the capital of", ("France", "Spain", "the moon"), 2, id="q2"),
    MCItem("A cat says ", ("meow", "woof woof woof"), 0, id="q3"),  # trailing space in context
    MCItem("", ("Hello", "Goodbye"), 1, id="q4"),  # empty context: scored after BOS
    MCItem("The blank", ("rest", "rest"), 0, id="q5", contexts=("Alice gave Bob", "Bob gave Alice")),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(harmjax Model on one device, the PyTorch reference model)."""
    hf_model = tiny_hf_model("llama", seed=3)
    directory = save_tiny_with_tokenizer(hf_model, tmp_path_factory.mktemp("tiny"))
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    return harmjax.load(directory, dtype="float32", mesh=mesh), hf_model, directory


def char_ids(text: str) -> list[int]:
    """The tiny tokenizer is character-level: one id per character, computed independently."""
    vocab = tiny_tokenizer().get_vocab()
    return [vocab[c] for c in text]


def torch_logprobs(hf_model, ids: list[int]) -> np.ndarray:
    """log p(token t | tokens < t) for t = 1..len-1, from transformers' forward."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def torch_choice_logprob(hf_model, context: str, continuation: str) -> float:
    # lm-eval moves the context's trailing whitespace into the scored continuation, and scores
    # an empty context after BOS.
    stripped = context.rstrip()
    ctx = char_ids(stripped) if stripped else [1]
    cont = char_ids(context[len(stripped):] + continuation)
    return float(torch_logprobs(hf_model, ctx + cont)[-len(cont):].sum())


def test_choice_logprobs_equal_pytorch(tiny):
    model, hf_model, _ = tiny
    result = utility.multiple_choice_accuracy(model, ITEMS, batch_size=16)
    expected_acc, expected_norm = 0, 0
    for item, row in zip(ITEMS, result["per_item"]):
        contexts = item.contexts or (item.context,) * len(item.choices)
        ref = np.array([torch_choice_logprob(hf_model, c, " " + ch) for c, ch in zip(contexts, item.choices)])
        np.testing.assert_allclose(row["logprobs"], ref, rtol=1e-5, atol=1e-4, err_msg=item.id)
        lengths = np.array([len(c) for c in item.choices], float)
        assert row["pred"] == int(np.argmax(ref)) and row["pred_norm"] == int(np.argmax(ref / lengths))
        expected_acc += int(np.argmax(ref)) == item.label
        expected_norm += int(np.argmax(ref / lengths)) == item.label
    assert result["n"] == len(ITEMS)
    assert result["acc"] == pytest.approx(expected_acc / len(ITEMS))
    assert result["acc_norm"] == pytest.approx(expected_norm / len(ITEMS))
    # Length normalisation changes at least one decision here, so acc_norm is really tested.
    assert any(r["pred"] != r["pred_norm"] for r in result["per_item"])


def test_multiple_choice_on_sharded_mesh_and_truncation(tiny):
    model, hf_model, directory = tiny
    sharded = harmjax.load(directory, dtype="float32", mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    # batch_size 3 rounds up to the mesh's batch extent (4): several batches, each sharded.
    one = utility.choice_logprobs(model, ITEMS, batch_size=16)
    eight = utility.choice_logprobs(sharded, ITEMS[:3], batch_size=3)
    assert len(eight) == 3
    for a, b in zip(one, eight):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    # max_length cuts the context from the left, keeping the continuation.
    item = ITEMS[0]
    cut = utility.choice_logprobs(model, [item], max_length=12)[0]
    for k, choice in enumerate(item.choices):
        ids = (char_ids(item.context) + char_ids(" " + choice))[-12:]
        ref = torch_logprobs(hf_model, ids)[-len(" " + choice):].sum()
        assert cut[k] == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("stride", [None, 64, 20])
def test_perplexity_equals_pytorch_sliding_window(tiny, stride):
    model, hf_model, _ = tiny
    max_length = 64
    result = utility.perplexity(model, CORPUS, max_length=max_length, batch_size=4, stride=stride)
    # The Hugging Face perplexity guide's loop, with labels and transformers' own loss.
    ids = torch.tensor([char_ids("\n\n".join(CORPUS))])
    step = max_length - 1 if stride is None else stride
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], step):
        end = min(begin + max_length, ids.shape[1])
        trg_len = end - prev_end
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        n_scored = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            loss = hf_model(window, labels=labels).loss
        total += float(loss) * n_scored
        count += n_scored
        prev_end = end
        if end == ids.shape[1]:
            break
    assert result["tokens"] == count
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    if stride is None:  # every token but the first is scored exactly once
        assert count == ids.shape[1] - 1


def test_rolling_windows_cover_each_token_once():
    for n, length, stride in [(10, 4, None), (100, 16, 5), (7, 16, None), (33, 8, 8)]:
        windows = utility.rolling_windows(n, length, stride)
        scored = [t for _, end, first in windows for t in range(first, end)]
        assert len(scored) == len(set(scored))
        assert all(end - begin <= length and begin < first for begin, end, first in windows)
        expected = set(range(1, n)) - (set(range(0, n, length)) if stride == length else set())
        assert set(scored) == expected
    with pytest.raises(ValueError, match="stride"):
        utility.rolling_windows(10, 4, stride=5)


def test_text_corpus_files_and_offline_hub(tmp_path):
    txt = tmp_path / "wiki.test.txt"
    txt.write_text("line one\n\nline two\n")
    assert utility.load_text_corpus(str(txt)) == ["line one\n\nline two\n"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert utility.load_text_corpus(str(jsonl)) == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "a"}\n')
    with pytest.raises(DatasetFormatError, match="text"):
        utility.load_text_corpus(str(bad))
    with pytest.raises(MissingFileError):
        utility.load_text_corpus(str(tmp_path / "missing.txt"))
    # The tests run with HF_HUB_OFFLINE=1: the error says what to pass instead.
    with pytest.raises(HubUnavailableError, match=r"\.txt"):
        utility.load_text_corpus("wikitext")


# Native hub rows of each task and the (context, choices, label) lm-evaluation-harness builds.
NATIVE = {
    "boolq": (
        {"passage": "Ice is frozen water.", "question": "is ice frozen water", "label": 1, "idx": 7},
        ("Ice is frozen water.\nQuestion: is ice frozen water?\nAnswer:", ("no", "yes"), 1, "7"),
    ),
    "rte": (
        {"sentence1": "A dog runs.", "sentence2": "An animal moves.", "label": 0, "idx": 3},
        ("A dog runs.\nQuestion: An animal moves. True or False?\nAnswer:", ("True", "False"), 0, "3"),
    ),
    "hellaswag": (
        {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
         "ctx_b": "he", "endings": ["is using wrap [title] to wrap.", "starts pulling up  roofing."],
         "label": "1"},
        ("Roof shingle removal: A man is sitting on a roof. He",
         ("is using wrap. to wrap.", "starts pulling up roofing."), 1, "24"),
    ),
    "arc_challenge": (
        {"id": "Mercury_7", "question": "Which is a metal?",
         "choices": {"text": ["wood", "iron", "glass"], "label": ["A", "B", "C"]}, "answerKey": "B"},
        ("Question: Which is a metal?\nAnswer:", ("wood", "iron", "glass"), 1, "Mercury_7"),
    ),
    "openbookqa": (
        {"id": "7-980", "question_stem": "The sun is responsible for",
         "choices": {"text": ["puppies", "plants sprouting"], "label": ["A", "B"]}, "answerKey": " B"},
        ("The sun is responsible for", ("puppies", "plants sprouting"), 1, "7-980"),
    ),
}


@pytest.mark.parametrize("task", sorted(NATIVE))
def test_task_formats_from_native_jsonl(tmp_path, task):
    row, (context, choices, label, ident) = NATIVE[task]
    path = tmp_path / f"{task}.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    items = utility.load_mc_task(task, path=str(path), limit=1)
    assert len(items) == 1
    item = items[0]
    assert (item.context, item.choices, item.label, item.id) == (context, choices, label, ident)
    assert item.requests() == [(context, " " + c) for c in choices]


def test_winogrande_partial_scoring_format(tmp_path):
    row = {"sentence": "Sarah was a better surgeon than Maria so _ always got the harder cases.",
           "option1": "Sarah", "option2": "Maria", "answer": "1"}
    path = tmp_path / "wg.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (item,) = utility.load_mc_task("winogrande", path=str(path))
    prefix = "Sarah was a better surgeon than Maria so "
    assert item.label == 0
    assert item.requests() == [
        (prefix + "Sarah", " always got the harder cases."),
        (prefix + "Maria", " always got the harder cases."),
    ]


def test_generic_schema_and_malformed_rows(tmp_path):
    path = tmp_path / "generic.jsonl"
    path.write_text(json.dumps({"context": "2+2=", "choices": ["4", "5"], "label": 0}) + "\n")
    (item,) = utility.load_mc_task("arc_challenge", path=str(path))
    assert (item.context, item.choices, item.label, item.id) == ("2+2=", ("4", "5"), 0, "0")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(NATIVE["boolq"][0]) + "\n" + json.dumps({"passage": "x", "label": 1}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"row 1.*'question'"):
        utility.load_mc_task("boolq", path=str(bad))
    bad.write_text(json.dumps({"context": "c", "choices": ["a", "b"], "label": 2}) + "\n")
    with pytest.raises(DatasetFormatError, match="row 0.*out of range"):
        utility.load_mc_task("rte", path=str(bad))
    with pytest.raises(ValueError, match="Unknown multiple-choice task"):
        utility.load_mc_task("mmlu", path=str(path))
    with pytest.raises(HubUnavailableError, match="path="):
        utility.load_mc_task("boolq")


# ------------------------------------------------------------------------------------ TriviaQA


def test_normalize_and_alias_matching():
    assert utility.normalize_answer("  The Beatles!") == "beatles"
    assert utility.normalize_answer("An  apple, a DAY") == "apple day"
    aliases = ["The Beatles", "Beatles (band)"]
    assert utility.exact_match(" beatles.\nQuestion: next", aliases)
    assert utility.exact_match("Beatles (Band), the band", aliases)  # cut at the first ","
    assert not utility.exact_match("The Rolling Stones", aliases)
    assert utility.alias_in("I think it was the Beatles, in 1963.", aliases)
    assert not utility.alias_in("Beatlesque music", aliases)  # whole words only
    assert utility.first_segment(" Paris, France.") == "Paris"
    assert utility.triviaqa_prompt("Who wrote Hamlet?") == "Question: Who wrote Hamlet?\nAnswer:"
    assert utility.triviaqa_prompt("Who wrote Hamlet") == "Question: Who wrote Hamlet?\nAnswer:"


def test_load_triviaqa_native_and_generic(tmp_path):
    path = tmp_path / "tqa.jsonl"
    rows = [
        {"question": "Capital of France?", "question_id": "tc_1",
         "answer": {"aliases": ["Paris", "Paree"], "normalized_aliases": ["paris", "paree"], "value": "Paris"}},
        {"question": "2+2", "aliases": ["4", "four"]},
        {"question": "Color of the sky", "answer": "blue"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = utility.load_triviaqa(str(path))
    assert items[0] == TriviaItem("Capital of France?", ("Paris", "Paree", "paris", "paree"), "tc_1")
    assert items[1].aliases == ("4", "four") and items[1].id == "1"
    assert items[2].aliases == ("blue",)
    assert len(utility.load_triviaqa(str(path), limit=2)) == 2
    path.write_text(json.dumps({"question": "no answer"}) + "\n")
    with pytest.raises(DatasetFormatError, match="row 0: no answers"):
        utility.load_triviaqa(str(path))


def torch_greedy(hf_model, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations from transformers' generate on the tiny model (no chat template)."""
    tok = tiny_tokenizer()
    out = []
    for prompt in prompts:
        ids = torch.tensor([char_ids(prompt)])
        with torch.no_grad():
            gen = hf_model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def test_triviaqa_accuracy_with_greedy_decode(tiny):
    model, hf_model, _ = tiny
    questions = ["Who wrote Hamlet?", "What is the capital of Peru", "Name a prime number?"]
    seen: list[str] = []

    def generate_fn(prompts):
        seen.extend(prompts)
        return torch_greedy(hf_model, prompts, max_new_tokens=12)

    preds = torch_greedy(hf_model, [utility.triviaqa_prompt(q) for q in questions], 12)
    words = [utility.normalize_answer(p).split() for p in preds]
    items = [
        TriviaItem(questions[0], ("zzz not it", utility.first_segment(preds[0]) or "#"), "a"),
        TriviaItem(questions[1], (words[1][-1] if words[1] else "#",), "b"),  # alias inside the text
        TriviaItem(questions[2], ("qqqq unrelated",), "c"),
    ]
    result = utility.triviaqa_accuracy(model, items, generate_fn=generate_fn, max_new_tokens=12)
    assert seen == [f"Question: {q.rstrip('?')}?\nAnswer:" for q in questions]
    assert [p["prediction"] for p in result["per_item"]] == preds
    expected_em = [utility.exact_match(p, it.aliases) for p, it in zip(preds, items)]
    expected_sub = [utility.alias_in(p, it.aliases) for p, it in zip(preds, items)]
    assert expected_sub[2] is False and expected_em[2] is False
    assert result["exact_match"] == pytest.approx(sum(expected_em) / 3)
    assert result["substring_match"] == pytest.approx(sum(expected_sub) / 3)
    assert result["n"] == 3


def test_triviaqa_default_generation_is_greedy(tiny):
    model, hf_model, _ = tiny
    items = [TriviaItem("Who wrote Hamlet?", ("Shakespeare",), "a"), TriviaItem("2+2", ("4",), "b")]
    result = utility.triviaqa_accuracy(model, items, max_new_tokens=10)
    expected = torch_greedy(hf_model, [utility.triviaqa_prompt(i.question) for i in items], 10)
    assert [p["prediction"] for p in result["per_item"]] == expected
