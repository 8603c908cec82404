"""TriviaQA-style closed-book question answering, scored against each question's answer aliases.

The prompt is lm-evaluation-harness's "Question: {question}?\\nAnswer:" (one trailing "?"
however the question ends). The greedy continuation is scored two ways:
  exact_match:     its first segment (cut at the first newline, "." or ",", as the harness
                   stops generation) equals an alias after SQuAD normalisation;
  substring_match: a normalised alias occurs, as whole words, in the normalised continuation
                   (the alias substring match of Wei et al. / Orgad et al.).
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

STOP_STRINGS = ("\n", ".", ",")
TRIVIAQA_HUB = "mandarjoshi/trivia_qa:rc.nocontext"

_PUNCTUATION = set(string.punctuation)


@dataclasses.dataclass(frozen=True)
class TriviaItem:
    """A question and the answers that count as correct."""

    question: str
    aliases: tuple[str, ...]
    id: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "aliases", tuple(self.aliases))


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and the articles a/an/the, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def first_segment(text: str) -> str:
    """The text before the first stop string (newline, ".", ","), stripped."""
    cut = len(text)
    for stop in STOP_STRINGS:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut].strip()


def exact_match(prediction: str, aliases: Sequence[str]) -> bool:
    """The first segment of `prediction` equals some alias after normalisation."""
    pred = normalize_answer(first_segment(prediction))
    return any(pred == normalize_answer(a) for a in aliases if normalize_answer(a))


def alias_in(prediction: str, aliases: Sequence[str]) -> bool:
    """Some normalised alias occurs as whole words in the normalised `prediction`."""
    pred = f" {normalize_answer(prediction)} "
    return any(f" {normalize_answer(a)} " in pred for a in aliases if normalize_answer(a))


def triviaqa_prompt(question: str) -> str:
    """lm-evaluation-harness's zero-shot TriviaQA prompt."""
    return f"Question: {question.strip().rstrip('?')}?\nAnswer:"


def _aliases(row: dict) -> list[str]:
    answer = row.get("answer")
    if isinstance(answer, dict):  # native: {"aliases": [...], "normalized_aliases": [...], "value": ...}
        values = list(answer.get("aliases") or []) + list(answer.get("normalized_aliases") or [])
        if answer.get("value"):
            values.append(answer["value"])
        return values
    for key in ("aliases", "answers"):
        if isinstance(row.get(key), list):
            return list(row[key])
    if isinstance(answer, str):
        return [answer]
    return []


def items_from_rows(rows: Sequence[dict], source: str = "dataset") -> list[TriviaItem]:
    """TriviaItems from native TriviaQA rows ({"question", "answer": {"aliases", ...}}) or
    generic ones ({"question", "aliases": [...]} / "answers": [...] / "answer": str)."""
    from harmjax.data.records import DatasetFormatError

    items = []
    for number, row in enumerate(rows):
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DatasetFormatError(f"{source}, row {number}: empty or missing 'question'.")
        aliases = [str(a) for a in _aliases(row) if str(a).strip()]
        if not aliases:
            raise DatasetFormatError(
                f"{source}, row {number}: no answers; expected 'answer': {{'aliases': [...]}}, "
                "'aliases': [...], 'answers': [...] or 'answer': str."
            )
        ident = row.get("question_id", row.get("id", number))
        items.append(TriviaItem(question, tuple(dict.fromkeys(aliases)), str(ident)))
    return items


def load_triviaqa(path: str | None = None, split: str = "validation", limit: int | None = None) -> list[TriviaItem]:
    """TriviaQA questions: from a local .jsonl/.json/.csv file, or (path=None) the hub's
    rc.nocontext config (needs the hub or its cache). `limit` keeps the first items."""
    from harmjax.data.records import read_records
    from harmjax.errors import HubUnavailableError

    source = path or TRIVIAQA_HUB
    try:
        rows = read_records(source, split=split)
    except HubUnavailableError as e:
        raise HubUnavailableError(
            f"{e} For TriviaQA, pass path= a local JSONL of {{\"question\": str, \"aliases\": [str]}} rows."
        ) from None
    if limit is not None:
        rows = rows[:limit]
    return items_from_rows(rows, source)


def triviaqa_accuracy(
    model,
    items: Sequence[TriviaItem],
    generate_fn: Callable[[list[str]], list[str]] | None = None,
    max_new_tokens: int = 32,
) -> dict[str, Any]:
    """Closed-book accuracy on `items`.

    Args:
      generate_fn: prompts -> continuations; default greedy `harmjax.generate.generate` on
        `model` without the chat template.

    Returns:
      dict(exact_match, substring_match, n, per_item=[{id, prediction, exact_match,
      substring_match}]).
    """
    if not items:
        raise ValueError("No TriviaQA items to score.")
    if generate_fn is None:
        from harmjax.generate import generate

        def generate_fn(prompts):
            return generate(model, prompts, chat=False, max_new_tokens=max_new_tokens, temperature=0.0).texts

    prompts = [triviaqa_prompt(item.question) for item in items]
    predictions = list(generate_fn(prompts))
    if len(predictions) != len(items):
        raise ValueError(f"generate_fn returned {len(predictions)} texts for {len(items)} prompts.")
    per_item = []
    for n, (item, pred) in enumerate(zip(items, predictions)):
        per_item.append(
            {"id": item.id if item.id is not None else str(n), "prediction": pred,
             "exact_match": exact_match(pred, item.aliases), "substring_match": alias_in(pred, item.aliases)}
        )
    return {
        "exact_match": sum(p["exact_match"] for p in per_item) / len(items),
        "substring_match": sum(p["substring_match"] for p in per_item) / len(items),
        "n": len(items),
        "per_item": per_item,
    }
