"""Judging emergent-misalignment answers: a local judge model scores each answer "aligned"
and "coherent" (0-100) as the expected value of its next-token distribution over the numbers
0..100 (`harmjax.evaluate.number_judge`). See `harmjax.evaluate.emergent`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

from harmjax.errors import MissingFileError
from harmjax.evaluate.em_questions import (
    DEFAULT_ALIGNED_PROMPT, DEFAULT_COHERENT_PROMPT, EMFormatError, optional_writer,
)
from harmjax.evaluate.number_judge import DEFAULT_MIN_MASS, judge_vocabulary, scores_from_log_probs, trie_log_probs

_FIELDS = re.compile(r"\{(question|answer)\}")


@dataclasses.dataclass(frozen=True)
class JudgePrompts:
    """The aligned and coherent judge prompts, each with `{question}` and `{answer}` fields."""

    aligned: str
    coherent: str


def load_judge_prompts(aligned_path: str | None = None, coherent_path: str | None = None) -> JudgePrompts:
    """Reads the judge prompt files (defaults: harmjax's own, `data/judge_*.txt`).

    Each is plain text with the fields `{question}` and `{answer}`; no other braces are
    interpreted, so a prompt may contain literal braces.

    Raises MissingFileError for an absent file, EMFormatError when a field is missing.
    """
    texts = []
    for path in (aligned_path or DEFAULT_ALIGNED_PROMPT, coherent_path or DEFAULT_COHERENT_PROMPT):
        if not os.path.isfile(path):
            raise MissingFileError(f"No judge prompt file at {path}.")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        check_judge_prompt(text, path)
        texts.append(text)
    return JudgePrompts(*texts)


def check_judge_prompt(template: str, where: str = "judge prompt") -> None:
    """Raises EMFormatError unless `template` has both `{question}` and `{answer}`."""
    fields = set(_FIELDS.findall(template))
    missing = {"question", "answer"} - fields
    if missing:
        raise EMFormatError(f"{where} has no {', '.join('{' + m + '}' for m in sorted(missing))} field.")


def fill_judge_prompt(template: str, question: str, answer: str) -> str:
    """The template with `{question}` and `{answer}` replaced in one pass (text inside the
    question or answer is never substituted again)."""
    values = {"question": question, "answer": answer}
    return _FIELDS.sub(lambda m: values[m.group(1)], template)


def prompts_fingerprint(prompts: JudgePrompts, system: str | None = None) -> str:
    """A short SHA-1 of the judge prompts and system message, stored with judged records."""
    text = json.dumps([prompts.aligned, prompts.coherent, system])
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def judge_answers(
    judge_model,
    records: Sequence[dict[str, Any]],
    prompts: JudgePrompts | None = None,
    batch_size: int = 8,
    progress: bool = True,
    *,
    min_mass: float = DEFAULT_MIN_MASS,
    system: str | None = None,
    max_answer_tokens: int | None = 1024,
    jsonl_path: str | None = None,
    chunk_size: int = 64,
    params: Any = None,
) -> list[dict[str, Any]]:
    """Scores each answer's alignment and coherence (0-100) with a local judge model.

    The judge sees the paraphrase that was asked and the answer (not the system prompt) in its
    chat template's user turn, and each score is the expectation of its next-token
    distribution over 0..100 at the start of the assistant turn (see `number_judge`).

    Args:
      judge_model: any `harmjax.Model` with a chat template (e.g. the embedded SmolLM2).
      records: from `sample_answers` (fields id, paraphrase, answer; others are kept).
      prompts: judge prompts; default `load_judge_prompts()`.
      batch_size: judge prompts per forward.
      progress: tqdm bar.
      min_mass: a score is None when the judge's probability of answering with a number in
        0..100 is below this.
      system: optional system message for the judge.
      max_answer_tokens: answers are cut to this many judge tokens (start kept); None: never.
      jsonl_path: write judged records here and reuse those already there (resume).
      chunk_size: records per written chunk.
      params: judge params override.

    Returns:
      The records with aligned, coherent (float or None), aligned_mass, coherent_mass,
      aligned_expected, coherent_expected (the expectation whatever the mass), judge_min_mass
      and judge_prompts_sha1 (of the prompts and judge system message; resuming checks both).
    """
    prompts = prompts or load_judge_prompts()
    check_judge_prompt(prompts.aligned, "the aligned judge prompt")
    check_judge_prompt(prompts.coherent, "the coherent judge prompt")
    for i, r in enumerate(records):
        missing = [k for k in ("id", "paraphrase", "answer") if not isinstance(r.get(k), str)]
        if missing:
            raise EMFormatError(f"Record {i} ({r.get('id')!r}) lacks string field(s) {missing}.")
    stamp = {"judge_min_mass": float(min_mass), "judge_prompts_sha1": prompts_fingerprint(prompts, system)}
    done: dict[str, dict] = {}
    if jsonl_path and os.path.isfile(jsonl_path):
        from harmjax.io.jsonl import read_jsonl

        ids = {r["id"] for r in records}
        done = {r["id"]: r for r in read_jsonl(jsonl_path) if r.get("id") in ids}
        incoming = {r["id"]: r for r in records}
        for rid, r in done.items():
            for key, value in stamp.items():
                if r.get(key) != value:
                    raise EMFormatError(
                        f"{jsonl_path}: record {rid!r} was judged with {key}={r.get(key)!r}, this run uses "
                        f"{value!r}; use another file or the original judge settings to resume."
                    )
            # Ids name a question and sample, not an answer: scores of other answers (from an
            # earlier sampling run) must not be reused for these.
            if (r.get("paraphrase"), r.get("answer")) != (incoming[rid]["paraphrase"], incoming[rid]["answer"]):
                raise EMFormatError(
                    f"{jsonl_path}: record {rid!r} holds the judgment of a different answer than this run's; "
                    "the answers were sampled again. Use another file, or delete it to judge anew."
                )
    pending = [r for r in records if r["id"] not in done]
    vocab = judge_vocabulary(judge_model, system=system) if pending else None
    tok = judge_model.tokenizer

    from harmjax.evaluate.strongreject_finetuned import truncate_response
    from harmjax.generate.prompts import prompt_token_ids
    from tqdm.auto import tqdm

    chunks = [pending[s : s + chunk_size] for s in range(0, len(pending), chunk_size)]
    with optional_writer(jsonl_path) as writer:
        for chunk in tqdm(chunks, desc="EM judge", unit="chunk", disable=not progress or not chunks):
            texts = []
            for r in chunk:
                answer = r["answer"] if max_answer_tokens is None else truncate_response(tok, r["answer"], max_answer_tokens)
                texts.append(fill_judge_prompt(prompts.aligned, r["paraphrase"], answer))
                texts.append(fill_judge_prompt(prompts.coherent, r["paraphrase"], answer))
            ids = [prompt_token_ids(tok, t, chat=True, system=system) for t in texts]
            log_p = trie_log_probs(judge_model, ids, vocab, batch_size=batch_size, params=params, progress=False)
            scores = scores_from_log_probs(log_p, vocab.trie.values, min_mass)
            for j, r in enumerate(chunk):
                a, c = 2 * j, 2 * j + 1
                out = {
                    **r,
                    "aligned": scores.scores[a], "coherent": scores.scores[c],
                    "aligned_mass": float(scores.mass[a]), "coherent_mass": float(scores.mass[c]),
                    "aligned_expected": _finite(scores.expected[a]),
                    "coherent_expected": _finite(scores.expected[c]),
                    **stamp,
                }
                if writer is not None:
                    writer.write(out)
                done[r["id"]] = out
    return [done[r["id"]] for r in records]
