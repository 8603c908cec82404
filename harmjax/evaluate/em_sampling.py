"""Sampling answers to the emergent-misalignment questions: N answers per question at
temperature 1, each (question, sample) drawing from its own fixed key, resumable through a
JSONL file. See `harmjax.evaluate.emergent` for the whole evaluation.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from harmjax.evaluate.em_questions import EMFormatError, EMQuestion, load_em_questions, optional_writer

DEFAULT_SAMPLES = 50  # per question (method.md; Betley et al. sample more per paraphrase)


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def sample_key_id(question_id: str, sample: int) -> int:
    """The integer folded into the sampling key of (question, sample): it depends on the
    question's id and the sample index only, not on batching, order or other questions."""
    return (_stable_hash(question_id) * 1_000_003 + int(sample)) % (2**31 - 1)


def paraphrase_index(question: EMQuestion, sample: int, seed: int) -> int:
    """The paraphrase sample `sample` of `question` asks, from an RNG seeded by (seed, id, sample)."""
    if len(question.paraphrases) == 1:
        return 0
    rng = np.random.default_rng([seed, _stable_hash(question.id), int(sample)])
    return int(rng.integers(len(question.paraphrases)))


def planned_samples(questions: Sequence[EMQuestion], n_samples: int | None, seed: int) -> list[dict[str, Any]]:
    """The (question, sample) items `sample_answers` generates, in order, without answers."""
    items = []
    for q in questions:
        n = n_samples if n_samples is not None else (q.samples or DEFAULT_SAMPLES)
        if n < 1:
            raise ValueError(f"Question {q.id!r}: need at least one sample, got {n}.")
        for k in range(n):
            p = paraphrase_index(q, k, seed)
            items.append({
                "id": f"{q.id}/{k}", "question_id": q.id, "sample": k, "paraphrase_index": p,
                "paraphrase": q.paraphrases[p], "system": q.system,
            })
    return items


_SETTINGS = ("seed", "temperature", "top_p", "max_new_tokens", "paraphrase", "system")


def sample_answers(
    model,
    questions: Sequence[EMQuestion] | None = None,
    n_samples: int | None = DEFAULT_SAMPLES,
    max_new_tokens: int = 600,
    temperature: float = 1.0,
    seed: int = 0,
    params: Any = None,
    batch_size: int = 16,
    progress: bool = True,
    *,
    top_p: float = 1.0,
    mask: Any = None,
    jsonl_path: str | None = None,
    chunk_size: int | None = None,
    keep_prompt_ids: bool = False,
) -> list[dict[str, Any]]:
    """Samples answers to the EM questions.

    Sample k of question q asks paraphrase `paraphrase_index(q, k, seed)` (as a chat user turn,
    with q's system prompt through the chat template's system turn) and draws with key
    fold_in(key(seed), `sample_key_id(q.id, k)`): the same answer whatever the batch size, the
    order, or the other questions.

    Args:
      model: a `harmjax.Model` with a chat template.
      questions: default `load_em_questions()`.
      n_samples: answers per question; None uses each question's own count from its file
        (default 50 where it has none).
      max_new_tokens, temperature, top_p, seed: sampling settings (Betley et al.: temperature 1).
      params: generate with these params instead of `model.params` (a pruned or merged copy).
      batch_size: sequences per generation batch.
      progress: tqdm bar over chunks.
      mask: optional pruning mask applied for the generation (see `harmjax.generate`).
      jsonl_path: append each finished record here; records already there are reused (the
        run resumes). Their settings must match, else EMFormatError.
      chunk_size: records generated (and written) per `generate` call; default 4 * batch_size.
      keep_prompt_ids: add each record's model input ids (`prompt_token_ids`).

    Returns:
      One record per (question, sample) in question order: id ("<question id>/<k>"),
      question_id, sample, paraphrase_index, paraphrase, system, answer, finished,
      n_tokens, prompt_tokens, and the settings (seed, temperature, top_p, max_new_tokens).
    """
    from harmjax.generate import generate

    questions = load_em_questions() if questions is None else list(questions)
    items = planned_samples(questions, n_samples, seed)
    settings = {"seed": seed, "temperature": float(temperature), "top_p": float(top_p),
                "max_new_tokens": int(max_new_tokens)}
    done = _existing_records(jsonl_path, items, settings) if jsonl_path else {}
    pending = [it for it in items if it["id"] not in done]
    chunk_size = chunk_size or 4 * batch_size
    # generate takes one system prompt per call: group by it (None first), chunks within.
    groups: dict[str | None, list[dict]] = {}
    for it in pending:
        groups.setdefault(it["system"], []).append(it)
    chunks = [g[s : s + chunk_size] for g in groups.values() for s in range(0, len(g), chunk_size)]
    if chunks:
        params = _generation_params(model, params, mask)

    from tqdm.auto import tqdm

    with optional_writer(jsonl_path) as writer:
        for chunk in tqdm(chunks, desc="EM answers", unit="chunk", disable=not progress or not chunks):
            res = generate(
                model, [it["paraphrase"] for it in chunk], max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, seed=seed, system=chunk[0]["system"],
                batch_size=batch_size, params=params, progress=False,
                sample_ids=[sample_key_id(it["question_id"], it["sample"]) for it in chunk],
            )
            for j, it in enumerate(chunk):
                record = {
                    **it, "answer": res.texts[j], "finished": bool(res.finished[j]),
                    "n_tokens": len(res.token_ids[j]), "prompt_tokens": len(res.prompt_token_ids[j]), **settings,
                }
                if keep_prompt_ids:
                    record["prompt_token_ids"] = list(res.prompt_token_ids[j])
                if writer is not None:
                    writer.write(record)
                done[it["id"]] = record
    return [done[it["id"]] for it in items]


def _generation_params(model, params: Any, mask: Any) -> Any:
    """The weights every chunk generates with: masked and fused (q/k/v, gate/up, when the
    devices have room) once here rather than again in each `generate` call."""
    from harmjax.model import fused

    params = model.params if params is None else params
    if mask is not None:
        from harmjax.masks import apply_mask

        params = apply_mask(params, mask)
    return fused.fuse_if_worthwhile(params, model.config, model.mesh)


def _existing_records(path: str, items: Sequence[dict], settings: dict) -> dict[str, dict]:
    """Records of `path` for the planned items, checked against this run's settings."""
    if not os.path.isfile(path):
        return {}
    from harmjax.io.jsonl import read_jsonl

    planned = {it["id"]: it for it in items}
    out = {}
    for record in read_jsonl(path):
        rid = record.get("id")
        if rid not in planned:
            continue
        expected = {**settings, **planned[rid]}
        for key in _SETTINGS:
            if record.get(key) != expected[key]:
                raise EMFormatError(
                    f"{path}: record {rid!r} has {key}={record.get(key)!r} but this run uses "
                    f"{expected[key]!r}; use another file or the original settings to resume."
                )
        out[rid] = record
    return out
