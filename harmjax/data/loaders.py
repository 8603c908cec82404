"""Loaders for the datasets the method uses, each returning a list of `Example`s.

  load_advbench(path)        AdvBench harmful_behaviors.csv: goal -> prompt, target -> response
  load_hexphi(directory)     HEx-PHI (gated; the user downloads it): category_<n>.csv files
  load_strongreject(path)    the StrongREJECT prompts (default: the embedded 313-prompt CSV)
  load_alpaca(path)          Alpaca-style instruction / input / output (JSON, JSONL or hub name)
  load_chat_jsonl(path)      chat JSONL {"messages": [{"role", "content"}, ...]} -> ChatExample
  filter_categories(examples, "A minus B")   category selection, incl. the cross-category split

Malformed input raises `DatasetFormatError` naming the file, the row and the column.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

from harmjax.data import records
from harmjax.data.records import DatasetFormatError, Example, read_records, to_examples
from harmjax.errors import MissingFileError

# HEx-PHI's eleven categories, by the number in their file names (category 2 is withheld
# from the public release by its authors).
HEXPHI_CATEGORIES = {
    1: "Illegal Activity",
    2: "Child Abuse Content",
    3: "Hate/Harass/Violence",
    4: "Malware",
    5: "Physical Harm",
    6: "Economic Harm",
    7: "Fraud/Deception",
    8: "Adult Content",
    9: "Political Campaigning",
    10: "Privacy Violation Activity",
    11: "Tailored Financial Advice",
}
HEXPHI_URL = "https://huggingface.co/datasets/LLM-Tuning-Safety/HEx-PHI"
_HEXPHI_FILE = re.compile(r"^category_(\d+)\.csv$", re.IGNORECASE)
# A first row holding one of these is a header, not a prompt.
_HEADER_WORDS = {"prompt", "prompts", "instruction", "text", "question", "goal"}


@dataclasses.dataclass(frozen=True)
class ChatExample(Example):
    """An `Example` that keeps the whole conversation it came from (for chat fine-tuning)."""

    messages: tuple[dict[str, str], ...] = dataclasses.field(default=(), hash=False)


def load_advbench(path: str, on_bad: str = "error") -> list[Example]:
    """AdvBench (harmful_behaviors.csv, or any file with `goal` and `target` columns):
    Example(prompt=goal, response=target)."""
    rows = read_records(path)
    examples, _ = to_examples(rows, prompt_key="goal", response_key="target", on_bad=on_bad, source=path)
    return examples


def load_hexphi(directory: str) -> list[Example]:
    """HEx-PHI from the directory of `category_<n>.csv` files the dataset ships as.

    Each file holds one prompt per row and no header (a first row that reads "prompt" or the
    like is skipped). The category is the file stem ("category_1"; `HEXPHI_CATEGORIES` names
    them) and ids are "category_1/<row>". HEx-PHI is gated: the user accepts its terms on the
    hub and downloads it; a missing directory says so.
    """
    if not os.path.isdir(directory):
        raise MissingFileError(
            f"No HEx-PHI directory at {directory}. HEx-PHI is gated: accept its terms at "
            f"{HEXPHI_URL}, download the category_<n>.csv files into one directory, and pass it."
        )
    files = sorted(
        (int(m.group(1)), name) for name in os.listdir(directory) if (m := _HEXPHI_FILE.match(name))
    )
    if not files:
        raise MissingFileError(
            f"{directory} has no category_<n>.csv files; download HEx-PHI from {HEXPHI_URL}."
        )
    examples = []
    for _, name in files:
        path = os.path.join(directory, name)
        category = os.path.splitext(name)[0].lower()
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
        for number, cells in enumerate(rows, start=1):
            if not cells:  # a blank line
                continue
            # One column: cells beyond the first come from unquoted commas inside the prompt.
            prompt = ",".join(cells).strip()
            if number == 1 and prompt.lower() in _HEADER_WORDS:
                continue
            if not prompt:
                raise DatasetFormatError(f"{path}, line {number}: empty prompt.")
            examples.append(Example(prompt, "", category, f"{category}/{number}"))
    return examples


def load_strongreject(path: str | None = None) -> list[Example]:
    """The StrongREJECT prompt set (columns category, source, forbidden_prompt); by default
    the embedded 313-prompt CSV from `harmjax.assets.strongreject_csv()`."""
    if path is None:
        from harmjax.assets import strongreject_csv

        path = strongreject_csv()
    rows = read_records(path)
    examples, _ = to_examples(
        rows, prompt_key="forbidden_prompt", response_key=None, category_key="category",
        require_response=False, source=path,
    )
    return examples


def _field(row: dict, key: str, source: str, number: int, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):
        if required:
            raise DatasetFormatError(f"{source}, row {number}: missing column {key!r}.")
        return ""
    if not isinstance(value, str):
        raise DatasetFormatError(f"{source}, row {number}: column {key!r} is {type(value).__name__}, not text.")
    return value


def load_alpaca(path: str, require_response: bool = True, on_bad: str = "error") -> list[Example]:
    """Alpaca-style rows {instruction, input, output} from a JSON list, JSONL or hub name
    (e.g. "yahma/alpaca-cleaned"): prompt = instruction + ("\\n\\n" + input if input),
    response = output. `on_bad="skip"` drops rows with an empty instruction or output."""
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}.")
    examples = []
    for number, row in enumerate(read_records(path)):
        instruction = _field(row, "instruction", path, number)
        extra = _field(row, "input", path, number, required=False)
        output = _field(row, "output", path, number, required=require_response)
        problem = "empty 'instruction'" if not instruction.strip() else (
            "empty 'output'" if require_response and not output.strip() else None
        )
        if problem:
            if on_bad == "skip":
                continue
            raise DatasetFormatError(f"{path}, row {number}: {problem}.")
        prompt = instruction + ("\n\n" + extra if extra.strip() else "")
        examples.append(Example(prompt, output, None, str(row.get("id", number))))
    return examples


def _message(message: Any, source: str, number: int, turn: int) -> dict[str, str]:
    if not isinstance(message, dict):
        raise DatasetFormatError(f"{source}, row {number}: message {turn} is not an object.")
    for key in ("role", "content"):
        if not isinstance(message.get(key), str):
            raise DatasetFormatError(f"{source}, row {number}: message {turn} has no text {key!r}.")
    return {"role": message["role"], "content": message["content"]}


def load_chat_jsonl(path: str, require_response: bool = True) -> list[ChatExample]:
    """Chat rows {"messages": [{"role", "content"}, ...]} (the emergent-misalignment datasets).

    response = the last assistant turn, prompt = the last user turn before it; the whole
    conversation is kept in `ChatExample.messages`. An optional "category" field is kept.
    """
    examples = []
    for number, row in enumerate(read_records(path)):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DatasetFormatError(f"{path}, row {number}: 'messages' must be a non-empty list.")
        messages = tuple(_message(m, path, number, t) for t, m in enumerate(messages))
        answer_at = max((t for t, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if answer_at is None and require_response:
            raise DatasetFormatError(f"{path}, row {number}: no assistant turn.")
        before = messages if answer_at is None else messages[:answer_at]
        prompt_at = max((t for t, m in enumerate(before) if m["role"] == "user"), default=None)
        if prompt_at is None:
            raise DatasetFormatError(f"{path}, row {number}: no user turn before the assistant's.")
        examples.append(
            ChatExample(
                prompt=messages[prompt_at]["content"],
                response=messages[answer_at]["content"] if answer_at is not None else "",
                category=row.get("category"),
                id=str(row.get("id", number)),
                messages=messages,
            )
        )
    return examples


# ------------------------------------------------------------------------ category filters


def _resolve(text: str, known: dict[str, str]) -> list[str] | None:
    """Category names in a comma list, matching known names (which may contain commas)."""
    text = text.strip()
    if text.lower() in known:
        return [known[text.lower()]]
    if text.lower() in ("all", "*"):
        return sorted(set(known.values()))
    for at in (i for i, ch in enumerate(text) if ch == ","):
        left, right = _resolve(text[:at], known), _resolve(text[at + 1 :], known)
        if left is not None and right is not None:
            return left + right
    return None


def parse_category_spec(spec: str, categories: Sequence[str]) -> tuple[list[str], list[str]]:
    """(include, exclude) category names from a spec over the known `categories`.

    Specs: "A", "A,B", "A-B" or "A minus B" (A's items without B's), "all minus B". Names are
    matched case-insensitively against the known ones, so names holding "," or "-" (StrongREJECT's
    "Hate, harassment and discrimination", "Non-violent crimes") work; an ambiguous or unknown
    name is an error listing the known categories.
    """
    known = {c.lower(): c for c in categories}
    whole = _resolve(spec, known)
    if whole is not None:
        return whole, []
    parts = re.split(r"\s+minus\s+", spec, maxsplit=1, flags=re.IGNORECASE)
    candidates = [tuple(parts)] if len(parts) == 2 else [
        (spec[:i], spec[i + 1 :]) for i, ch in enumerate(spec) if ch == "-"
    ]
    for left, right in candidates:
        include, exclude = _resolve(left, known), _resolve(right, known)
        if include is not None and exclude is not None:
            return include, exclude
    raise ValueError(
        f"Category spec {spec!r} does not name known categories. Use 'A', 'A,B', 'A-B', "
        f"'A minus B' or 'all minus B' with A, B among: {sorted(set(known.values()))}."
    )


def filter_categories(examples: Sequence[Example], spec: str | None) -> list[Example]:
    """The examples a category spec selects ("A", "A,B", "A-B" / "A minus B"; None or "" = all).

    "A minus B" keeps A's items, dropping any whose prompt also appears among B's items (the
    cross-category protocol: prune on A without B's prompts, evaluate on B).
    """
    if not spec or not spec.strip():
        return list(examples)
    categories = sorted({e.category for e in examples if e.category is not None})
    include, exclude = parse_category_spec(spec, categories)
    selected = records.filter_categories(examples, include=include, exclude=exclude)
    if exclude:
        excluded_prompts = {e.prompt for e in records.filter_categories(examples, include=exclude)}
        selected = [e for e in selected if e.prompt not in excluded_prompts]
    return selected


LOADERS = {
    "advbench": load_advbench,
    "hexphi": load_hexphi,
    "strongreject": load_strongreject,
    "alpaca": load_alpaca,
    "chat": load_chat_jsonl,
}
_ALIASES = {"hex-phi": "hexphi", "hex_phi": "hexphi", "chat_jsonl": "chat", "jsonl_chat": "chat",
            "strong_reject": "strongreject"}


def load_dataset_by_name(kind: str, path: str | None = None, category: str | None = None) -> list[Example]:
    """Dispatches to the loader of `kind` (advbench, hexphi, strongreject, alpaca, chat), then
    applies the category spec `category` (see `filter_categories`).

    `kind="records"` reads any table with prompt / response / category columns through
    `records.read_records`. Only strongreject has a default path.
    """
    key = _ALIASES.get(kind.lower(), kind.lower())
    if key == "records":
        if path is None:
            raise ValueError("kind='records' needs a path.")
        rows = read_records(path)
        has_category = bool(rows) and "category" in rows[0]
        examples, _ = to_examples(
            rows, response_key="response", category_key="category" if has_category else None,
            require_response=False, source=path,
        )
    elif key in LOADERS:
        if path is None and key != "strongreject":
            raise ValueError(f"Dataset kind {kind!r} needs a path.")
        examples = LOADERS[key](path) if path is not None else LOADERS[key]()
    else:
        raise ValueError(f"Unknown dataset kind {kind!r}; known: {', '.join([*LOADERS, 'records'])}.")
    return filter_categories(examples, category)
