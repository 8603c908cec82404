"""Tables of (prompt, response, category) records from local files or the `datasets` hub.

Everything the method reads (harmful pruning sets, benign retain sets, evaluation prompts)
is a list of `Example`s. `read_records` turns a CSV / JSONL / JSON / Parquet file or a hub
dataset name into plain dict rows; `to_examples` picks the columns, and refuses (or skips and
counts, when asked) rows with a missing column or an empty response, so a malformed row can
never turn into a silently wrong score.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from absl import logging

from harmjax.errors import HarmjaxError, HubUnavailableError, MissingFileError


class DatasetFormatError(HarmjaxError, ValueError):
    """A dataset file or row does not have the shape or columns the caller asked for."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One (prompt, response) pair; `response` is empty for prompt-only evaluation sets."""

    prompt: str
    response: str = ""
    category: str | None = None
    id: str | None = None


_LOCAL_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


def read_records(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local .csv/.tsv/.jsonl/.json/.parquet file, or of a `datasets` hub dataset.

    Args:
      source: a file path, or a hub name such as "tatsu-lab/alpaca" (optionally
        "name:config", e.g. "wikitext:wikitext-2-raw-v1").
      split: the hub split (ignored for local files).

    Raises:
      MissingFileError: a path-like source that does not exist.
      DatasetFormatError: a file that cannot be parsed as a table of objects.
      HubUnavailableError: a hub name when the hub is unreachable and nothing is cached.
    """
    if source.lower().endswith(_LOCAL_SUFFIXES) or os.path.exists(source):
        if not os.path.isfile(source):
            raise MissingFileError(f"No dataset file at {source}.")
        return _read_local(source)
    return _read_hub(source, split)


def _read_local(path: str) -> list[dict[str, Any]]:
    lower = path.lower()
    if lower.endswith((".csv", ".tsv")):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if lower.endswith(".tsv") else ",")
            if not reader.fieldnames:
                raise DatasetFormatError(f"{path}: empty CSV (no header row).")
            rows = []
            for number, row in enumerate(reader, start=2):
                if None in row:  # more cells than header columns
                    raise DatasetFormatError(f"{path}, line {number}: more cells than header columns.")
                rows.append(dict(row))
            return rows
    if lower.endswith(".jsonl"):
        from harmjax.io.jsonl import JsonlFormatError, read_jsonl

        try:
            return read_jsonl(path)
        except JsonlFormatError as e:
            raise DatasetFormatError(str(e)) from None
    if lower.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DatasetFormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
        if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} wrappers
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DatasetFormatError(f"{path}: expected a JSON list of objects (or one wrapping key).")
            data = lists[0]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DatasetFormatError(f"{path}: expected a JSON list of objects.")
        return data
    if lower.endswith(".parquet"):
        import datasets

        return list(datasets.load_dataset("parquet", data_files=path, split="train"))
    raise DatasetFormatError(f"{path}: unknown file type; use one of {', '.join(_LOCAL_SUFFIXES)}.")


def _read_hub(name: str, split: str) -> list[dict[str, Any]]:
    import datasets

    path, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(path, config or None, split=split)
    except (ConnectionError, OSError) as e:
        raise HubUnavailableError(
            f"Cannot load dataset {name!r} (split {split!r}) from the hub and it is not cached: {e}. "
            "Pass a local .csv/.jsonl/.json file instead."
        ) from None
    except ValueError as e:  # unknown split or config
        raise DatasetFormatError(f"Dataset {name!r}: {e}") from None
    return list(ds)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from pandas-written CSVs
        return None
    return str(value)


def to_examples(
    rows: Sequence[dict[str, Any]],
    prompt_key: str = "prompt",
    response_key: str | None = "response",
    category_key: str | None = None,
    id_key: str | None = None,
    require_response: bool = True,
    on_bad: str = "error",
    source: str = "dataset",
) -> tuple[list[Example], int]:
    """Builds `Example`s from dict rows, checking every row.

    A row whose prompt is missing/empty, or (with `require_response`) whose response is missing
    or empty, is an error naming the source, the row number and the column; with
    `on_bad="skip"` it is skipped instead and counted in the returned `n_skipped` (and logged).
    Ids default to the row number, so results stay traceable to input rows.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}.")
    if rows:
        columns = set().union(*(r.keys() for r in rows[:1]))
        wanted = [k for k in (prompt_key, response_key if require_response else None, category_key) if k]
        absent = [k for k in wanted if k not in columns]
        if absent:
            raise DatasetFormatError(
                f"{source}: no column {', '.join(map(repr, absent))}; columns are {sorted(columns)}."
            )
    examples, skipped = [], 0
    for number, row in enumerate(rows):
        prompt = _text(row.get(prompt_key))
        response = _text(row.get(response_key)) if response_key else None
        problem = None
        if not prompt or not prompt.strip():
            problem = f"empty or missing {prompt_key!r}"
        elif require_response and (not response or not response.strip()):
            problem = f"empty or missing {response_key!r}"
        if problem:
            if on_bad == "error":
                raise DatasetFormatError(
                    f"{source}, row {number}: {problem}. Fix the row, or skip such rows "
                    "(on_bad='skip' / --skip_bad_rows)."
                )
            skipped += 1
            continue
        category = _text(row.get(category_key)) if category_key else None
        ident = _text(row.get(id_key)) if id_key else None
        examples.append(Example(prompt, response or "", category, ident if ident is not None else str(number)))
    if skipped:
        logging.warning("%s: skipped %d malformed rows of %d.", source, skipped, len(rows))
    return examples, skipped


def filter_categories(
    examples: Iterable[Example], include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> list[Example]:
    """Examples whose category is in `include` (all if None) and not in `exclude`.

    Matching is case-insensitive. Used for cross-category tests: prune on A minus B, evaluate
    on B.
    """
    inc = {c.lower() for c in include} if include else None
    exc = {c.lower() for c in exclude} if exclude else set()
    out = []
    for ex in examples:
        cat = (ex.category or "").lower()
        if (inc is None or cat in inc) and cat not in exc:
            out.append(ex)
    return out


def sample(examples: Sequence[Example], nsamples: int | None, seed: int) -> list[Example]:
    """A seeded sample of `nsamples` examples without replacement (all, shuffled, if None or
    larger than the set). The same seed always gives the same sample."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(examples))
    if nsamples is not None and nsamples < len(examples):
        order = order[:nsamples]
    return [examples[i] for i in order]
