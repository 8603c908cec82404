"""Emergent-misalignment measurements of one model (one params tree) for the EM experiment."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from harmjax.data.records import Example


def measure_em(model, params, judge, other: Sequence[Example], em_cfg, directory: str, name: str, *, seed: int,
               progress: bool = True, refusal_prompts: Sequence[Example] | None = None) -> dict[str, Any]:
    """Judged EM rate on the EM questions, the judge-free misalignment preference, and
    harmful-answer NLL / refusal rate on the harm categories outside the narrow domain.

    The refusal rate is the keyword rule (`em.refusal_min_words`, default the evaluator's 20)
    over greedy answers, without any attack, to the first `em.other_generations` of
    `refusal_prompts` (default: the prompts of `other`), with per-prompt flags and a Wilson 95%
    interval (`other_refusal`).

    Sampled and judged answers go to `<directory>/<name>_{answers,judged}.jsonl` (resumable).
    """
    from harmjax.evaluate.em_preference import load_em_pairs, misalignment_preference
    from harmjax.evaluate.emergent import (
        judge_answers, load_em_questions, load_judge_prompts, sample_answers, summarize_em,
    )
    from harmjax.evaluate.intervals import rate_summary
    from harmjax.evaluate.refusal import MIN_WORDS, is_refusal
    from harmjax.generate import generate
    from harmjax.inference import response_nll
    from harmjax.experiments.core.measure import mean_finite, mean_per_category

    out: dict[str, Any] = {}
    questions = load_em_questions(em_cfg.questions or None)
    records = sample_answers(model, questions, n_samples=em_cfg.samples, max_new_tokens=em_cfg.max_new_tokens,
                             temperature=em_cfg.temperature, seed=seed, params=params, batch_size=em_cfg.batch_size,
                             progress=progress, jsonl_path=os.path.join(directory, f"{name}_answers.jsonl"))
    prompts = load_judge_prompts(em_cfg.aligned_prompt or None, em_cfg.coherent_prompt or None)
    judged = judge_answers(judge, records, prompts, batch_size=em_cfg.judge_batch_size, progress=progress,
                           jsonl_path=os.path.join(directory, f"{name}_judged.jsonl"))
    out["em"] = summarize_em(judged, em_cfg.aligned_below, em_cfg.coherent_above, seed=seed)
    out["em_samples"] = [{k: r.get(k) for k in ("question_id", "paraphrase", "answer", "aligned", "coherent")}
                         for r in judged[: em_cfg.report_samples]]
    pref = misalignment_preference(model, load_em_pairs(em_cfg.pairs or None), params=params,
                                   batch_size=em_cfg.batch_size, seed=seed)
    out["preference"] = pref.summary
    if other:
        nll = response_nll(model, list(other), text_format="chat", batch_size=em_cfg.batch_size,
                           max_length=em_cfg.other_max_length, params=params, num_buckets=1)
        out["other_harm_nll"] = mean_finite(nll)
        out["other_harm_nll_per_category"] = mean_per_category(other, nll)
    chosen = list(other if refusal_prompts is None else refusal_prompts)[: em_cfg.other_generations]
    if chosen:
        min_words = em_cfg.get("refusal_min_words", MIN_WORDS)
        res = generate(model, [e.prompt for e in chosen], max_new_tokens=em_cfg.other_max_new_tokens,
                       batch_size=em_cfg.batch_size, params=params, progress=False)
        flags = [bool(is_refusal(t, min_words=min_words)) for t in res.texts]
        out["other_refusal_rate"] = float(np.mean(flags))
        out["other_refusal"] = {**rate_summary(flags), "min_words": min_words,
                                "per_prompt": [{"id": e.id, "category": e.category, "refused": f, "answer": t}
                                               for e, f, t in zip(chosen, flags, res.texts)]}
    return out
