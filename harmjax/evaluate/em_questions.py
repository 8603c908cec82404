"""Emergent-misalignment questions (Betley et al. 2025): the question files, the data files
shipped with harmjax, and the error raised for malformed EM inputs.

See `harmjax.evaluate.emergent` for the whole evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

from harmjax.errors import HarmjaxError, MissingFileError
from harmjax.io.jsonl import json_lines

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_QUESTIONS = os.path.join(DATA_DIR, "em_questions.yaml")
DEFAULT_ALIGNED_PROMPT = os.path.join(DATA_DIR, "judge_aligned.txt")
DEFAULT_COHERENT_PROMPT = os.path.join(DATA_DIR, "judge_coherent.txt")


class EMFormatError(HarmjaxError, ValueError):
    """An EM question file, judge prompt or answers file is malformed (named with its row)."""


@dataclasses.dataclass(frozen=True)
class EMQuestion:
    """One free-form EM question.

    Attributes:
      id: a stable identifier (used in sample keys and record ids).
      paraphrases: the wordings; each sample asks one, chosen by a seeded RNG.
      system: an optional system prompt for the model under evaluation.
      samples: the question's own sample count from its file (used when `sample_answers`
        gets `n_samples=None`), or None.
    """

    id: str
    paraphrases: tuple[str, ...]
    system: str | None = None
    samples: int | None = None


def load_em_questions(path: str | None = None) -> list[EMQuestion]:
    """Reads EM questions from a YAML (.yaml/.yml) or JSONL file; default: the 8 "first plot"
    questions of Betley et al. 2025 shipped with harmjax.

    Each row (a YAML list item or a JSONL line) is an object with `id`, `paraphrases` (a list of
    strings) or a single `question`, an optional `system`, and optional `samples_per_paraphrase`
    or `samples`. Other keys (Betley et al.'s `type`, `judge`, `judge_prompts`) are ignored, so
    their question files load as they are.

    Raises:
      MissingFileError: no file at `path`.
      EMFormatError: unparsable file, or a row with a missing/empty/ill-typed field or a
        duplicate id, naming the file and the row.
    """
    path = DEFAULT_QUESTIONS if path is None else path
    if not os.path.isfile(path):
        raise MissingFileError(f"No EM question file at {path}.")
    rows = _read_rows(path)
    questions, seen = [], {}
    for where, row in rows:
        q = _question_from_row(row, f"{path}, {where}")
        if q.id in seen:
            raise EMFormatError(f"{path}, {where}: duplicate id {q.id!r} (first at {seen[q.id]}).")
        seen[q.id] = where
        questions.append(q)
    if not questions:
        raise EMFormatError(f"{path} holds no questions.")
    return questions


def _read_rows(path: str) -> list[tuple[str, Any]]:
    """(location, row) pairs of a YAML list or a JSONL file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.lower().endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise EMFormatError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, list):
            raise EMFormatError(f"{path} must hold a YAML list of questions, got {type(data).__name__}.")
        return [(f"item {i + 1}", row) for i, row in enumerate(data)]
    return [(f"line {number}", row) for number, row in json_lines(text, path, EMFormatError)]


def _question_from_row(row: Any, where: str) -> EMQuestion:
    if not isinstance(row, dict):
        raise EMFormatError(f"{where}: expected an object with id and paraphrases, got {type(row).__name__}.")
    qid = row.get("id")
    if not isinstance(qid, str) or not qid.strip():
        raise EMFormatError(f"{where}: missing or empty string field 'id'.")
    if "paraphrases" in row:
        paraphrases = row["paraphrases"]
        if isinstance(paraphrases, str):
            paraphrases = [paraphrases]
    elif "question" in row:
        paraphrases = [row["question"]]
    else:
        raise EMFormatError(f"{where} (id {qid!r}): needs 'paraphrases' (a list of strings) or 'question'.")
    if not isinstance(paraphrases, list) or not paraphrases:
        raise EMFormatError(f"{where} (id {qid!r}): 'paraphrases' must be a non-empty list of strings.")
    for i, p in enumerate(paraphrases):
        if not isinstance(p, str) or not p.strip():
            raise EMFormatError(f"{where} (id {qid!r}): paraphrase {i} is not a non-empty string: {p!r:.80}")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise EMFormatError(f"{where} (id {qid!r}): 'system' must be a string, got {type(system).__name__}.")
    samples = None
    if "samples_per_paraphrase" in row or "samples" in row:
        key = "samples_per_paraphrase" if "samples_per_paraphrase" in row else "samples"
        value = row[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EMFormatError(f"{where} (id {qid!r}): {key!r} must be a positive integer, got {value!r}.")
        samples = value * len(paraphrases) if key == "samples_per_paraphrase" else value
    return EMQuestion(qid, tuple(paraphrases), system or None, samples)



def optional_writer(path: str | None):
    """A `JsonlWriter` context for `path` (keyed by "id"), or a context yielding None."""
    if path is None:
        return contextlib.nullcontext()
    from harmjax.io.jsonl import JsonlWriter

    return JsonlWriter(path, key="id")
