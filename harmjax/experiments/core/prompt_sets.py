"""The experiment's prompt sets: harmful prompts split per category into pruning and held-out
evaluation prompts, and benign instructions split into retain and held-out prompts.

Splits are seeded per category (a category's split does not depend on the others), so the
same seed always gives the same sets, on any machine.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from harmjax.data.records import DatasetFormatError, Example, read_records, to_examples


def _category_rng(seed: int, category: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(category.encode())])


def split_per_category(
    examples: Sequence[Example], per_category: int, heldout_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(pruning, held-out) examples: within each category a seeded sample of `per_category`
    (0 = all), of which round(heldout_fraction * n) (at least 1 when n >= 2) are held out.
    Both lists keep the input order."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}.")
    by_cat: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_cat.setdefault(e.category or "all", []).append(i)
    prune, held = set(), set()
    for cat, idx in by_cat.items():
        order = _category_rng(seed, cat).permutation(len(idx))
        chosen = [idx[j] for j in order[: per_category or len(idx)]]
        n_held = int(round(heldout_fraction * len(chosen)))
        if heldout_fraction > 0 and len(chosen) >= 2:
            n_held = min(max(n_held, 1), len(chosen) - 1)
        held.update(chosen[:n_held])
        prune.update(chosen[n_held:])
    return [examples[i] for i in sorted(prune)], [examples[i] for i in sorted(held)]


def load_harmful_prompts(path: str = "", prompt_key: str = "forbidden_prompt", category_key: str = "category") -> list[Example]:
    """Harmful prompts with categories: the embedded StrongREJECT set when `path` is "", else a
    .csv/.jsonl/.json file (or hub name) with `prompt_key` and `category_key` columns.
    Ids are "h<row>" so later stages can key on them."""
    if not path:
        from harmjax.data.loaders import load_strongreject

        rows = load_strongreject()
    else:
        records = read_records(path)
        rows, _ = to_examples(records, prompt_key=prompt_key, response_key=None,
                              category_key=category_key or None, require_response=False, source=path)
    if not rows:
        raise DatasetFormatError(f"No harmful prompts in {path or 'the embedded StrongREJECT set'}.")
    return [Example(prompt=e.prompt, category=e.category or "all", id=f"h{i:04d}") for i, e in enumerate(rows)]


def load_pruning_prompts(path: str, prompt_key: str = "goal", limit: int = 0, seed: int = 0) -> list[Example]:
    """An extra harmful pruning set without categories (e.g. AdvBench's harmful_behaviors.csv,
    column `goal`), seeded sample of `limit` (0 = all); ids "a<row>", category "extra"."""
    records = read_records(path)
    rows, _ = to_examples(records, prompt_key=prompt_key, response_key=None, require_response=False, source=path)
    if not rows:
        raise DatasetFormatError(f"No prompts in {path} (column {prompt_key!r}).")
    idx = np.arange(len(rows))
    if limit and limit < len(rows):
        idx = np.sort(np.random.default_rng(seed).permutation(len(rows))[:limit])
    return [Example(prompt=rows[i].prompt, category="extra", id=f"a{i:04d}") for i in idx]


def load_benign_prompts(path: str = "", prompt_key: str = "instruction") -> list[Example]:
    """Benign instructions: harmjax's package set when `path` is "", else a file with a
    `prompt_key` column (and an optional `category`). Ids are "b<row>"."""
    from harmjax.data.benign_set import load_benign_instructions

    if not path:
        rows = load_benign_instructions()
    else:
        records = read_records(path)
        category_key = "category" if records and "category" in records[0] else None
        rows, _ = to_examples(records, prompt_key=prompt_key, response_key=None, category_key=category_key,
                              require_response=False, source=path)
    if not rows:
        raise DatasetFormatError(f"No benign prompts in {path or 'the package benign set'}.")
    return [Example(prompt=e.prompt, category=e.category or "benign", id=f"b{i:04d}") for i, e in enumerate(rows)]
