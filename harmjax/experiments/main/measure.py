"""Measurements of one (masked) model for the main experiment: held-out harmful-answer NLL per
category (harmful capability: higher = the model finds its own harmful answers less likely),
held-out benign-answer NLL (utility), and generations on a fixed subset of held-out harmful
prompts (keyword refusal rate, side-by-side samples, and the StrongREJECT judge when given).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from harmjax.data.records import Example
from harmjax.experiments.core.measure import mean_finite, mean_per_category
from harmjax.evaluate.refusal import is_refusal
from harmjax.inference import response_nll


def nll_metrics(
    model,
    params,
    harmful: Sequence[Example],
    benign: Sequence[Example] | None,
    *,
    text_format: str,
    max_length: int,
    batch_size: int,
) -> dict[str, Any]:
    """harm_nll (mean over held-out harmful answers), harm_nll_per_category, and with `benign`
    benign_nll and benign_ppl, of `params` (a masked copy of the model's); per_prompt: the
    per-answer values (`per_prompt_nll`)."""
    out: dict[str, Any] = {}
    # Harmful and benign answers in one pass of one padded length: one compilation in all.
    both = list(harmful) + list(benign or [])
    all_nll = response_nll(model, both, text_format=text_format, batch_size=batch_size,
                           max_length=max_length, params=params, num_buckets=1)
    nll, b = all_nll[: len(harmful)], all_nll[len(harmful):]
    out["harm_nll"] = mean_finite(nll)
    out["harm_nll_per_category"] = mean_per_category(harmful, nll)
    if benign:
        out["benign_nll"] = mean_finite(b)
        out["benign_ppl"] = math.exp(out["benign_nll"]) if math.isfinite(out["benign_nll"]) else float("nan")
    out["per_prompt"] = per_prompt_nll(harmful, nll, benign, b)
    return out


def per_prompt_nll(harmful, harm_nll, benign, benign_nll) -> dict[str, Any]:
    """The per-answer NLLs the means are made of, with the answers' ids (and the harmful ones'
    categories), kept so the report can bootstrap over prompts (`main.intervals`)."""
    out = {"harm_ids": [e.id for e in harmful], "harm_categories": [e.category for e in harmful],
           "harm_nll": [float(x) for x in harm_nll]}
    if benign:
        out.update(benign_ids=[e.id for e in benign], benign_nll=[float(x) for x in benign_nll])
    return out


def generation_metrics(
    model,
    params,
    generation_prompts: Sequence[Example],
    *,
    max_new_tokens: int,
    generation_batch_size: int,
    prefixes: Sequence[str] | None = None,
    judge: Callable[[list[str], list[str]], np.ndarray] | None = None,
    refusal_min_words: int = 20,
) -> dict[str, Any]:
    """Greedy generations of `params` on `generation_prompts`: refusal_rate, samples [{id,
    category, prompt, response, refused}], and strongreject (mean judge score) when `judge`.
    A response counts as a refusal when it has a refusal phrase or fewer than
    `refusal_min_words` words."""
    from harmjax.generate import generate

    result = generate(model, [e.prompt for e in generation_prompts], prefixes=prefixes,
                      max_new_tokens=max_new_tokens, batch_size=generation_batch_size, params=params,
                      progress=False)
    responses = [pre + text for pre, text in zip(result.prefixes, result.texts)]
    flags = [bool(is_refusal(r, min_words=refusal_min_words)) for r in responses]
    out: dict[str, Any] = {"refusal_rate": float(np.mean(flags))}
    out["samples"] = [{"id": e.id, "category": e.category, "prompt": e.prompt, "response": r, "refused": f}
                      for e, r, f in zip(generation_prompts, responses, flags)]
    if judge is not None:
        scores = judge([e.prompt for e in generation_prompts], responses)
        out["strongreject"] = mean_finite(scores)
        for s, v in zip(out["samples"], scores):
            s["strongreject"] = float(v)
    return out


def measure(
    model,
    params,
    harmful: Sequence[Example],
    benign: Sequence[Example] | None,
    generation_prompts: Sequence[Example] | None,
    *,
    text_format: str,
    max_length: int,
    batch_size: int,
    max_new_tokens: int,
    generation_batch_size: int,
    prefixes: Sequence[str] | None = None,
    judge: Callable[[list[str], list[str]], np.ndarray] | None = None,
    utility: Callable[[Any], dict[str, float]] | None = None,
    refusal_min_words: int = 20,
) -> dict[str, Any]:
    """The metrics of `params` (a masked copy of the model's): see the module docstring.

    Returns `nll_metrics` (harm_nll, harm_nll_per_category, benign_nll and benign_ppl when
    `benign`), with `generation_prompts` also `generation_metrics` (refusal_rate, samples,
    strongreject when `judge`). `utility(params)` adds its metrics (e.g. multiple-choice
    accuracies). Lower `refusal_min_words` for short generations, whose truncated answers
    would otherwise count as refusals.
    """
    out = nll_metrics(model, params, harmful, benign, text_format=text_format, max_length=max_length,
                      batch_size=batch_size)
    if generation_prompts:
        out.update(generation_metrics(model, params, generation_prompts, max_new_tokens=max_new_tokens,
                                      generation_batch_size=generation_batch_size, prefixes=prefixes, judge=judge,
                                      refusal_min_words=refusal_min_words))
    if utility is not None:
        out.update(utility(params))
    return out
