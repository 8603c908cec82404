"""Dissociation's data: samples of the refusal tuning's split, the model's prefilled answers,
and the check that no held-out prompt is scored."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from harmjax.data.records import Example
from harmjax.evaluate.refusal import is_refusal
from harmjax.experiments.core.prompt_sets import split_per_category


def sample(examples, per_category: int, seed: int) -> list[Example]:
    """A seeded sample of `per_category` examples per category (all with 0)."""
    return split_per_category(list(examples), per_category, 0.0, seed)[0] if per_category else list(examples)


def prefilled_answers(model, examples: Sequence[Example], path: str, *, prefix: str, max_new_tokens: int,
                      batch_size: int, chunk: int, min_words: int,
                      question: str = "{prompt}") -> list[dict[str, Any]]:
    """Greedy answers with the assistant turn prefilled by `prefix` (to `question` filled with
    each prompt), resumable in the JSONL file `path`; rows as `answers.generate_answers`
    writes them (response = prefix + continuation; refused by the keyword rule with `min_words`)."""
    from harmjax.generate import generate
    from harmjax.io.jsonl import JsonlWriter, read_jsonl

    with JsonlWriter(path, key="id") as out:
        todo = [e for e in examples if e.id not in out.done]
        for s in range(0, len(todo), chunk):
            part = todo[s : s + chunk]
            res = generate(model, [question.format(prompt=e.prompt) for e in part], prefixes=[prefix] * len(part),
                           max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
            for e, pre, text, ids in zip(part, res.prefixes, res.texts, res.token_ids):
                response = pre + text
                out.write({"id": e.id, "category": e.category, "prompt": e.prompt, "prefix": pre,
                           "response": response, "attacked": True, "tokens": len(ids),
                           "refused": bool(is_refusal(response, min_words=min_words))})
    by_id = {r["id"]: r for r in read_jsonl(path)}
    return [by_id[e.id] for e in examples]


def check_disjoint(scored: Sequence[Example], heldout: Sequence[Example]) -> None:
    """Raises ValueError when a held-out prompt is in the scoring sets."""
    both = {e.id for e in scored} & {e.id for e in heldout}
    if both:
        raise ValueError(f"Held-out prompts are in the scoring sets: {sorted(both)[:5]}.")
