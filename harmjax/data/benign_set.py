"""The benign instruction set shipped with harmjax, and its seeded retain / held-out split.

The package data `harmjax/data/benign/instructions.jsonl` holds 132 short, clearly safe
instructions written for this project (six categories; see `benign/README.md`). The model's
own answers to them become the retain (utility) set of the attribution and the held-out
benign set of the evaluation, so the two must never share an instruction: the loader refuses
duplicate ids and duplicate instructions, and `split_benign` partitions by example.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from harmjax.data.records import Example
from harmjax.data.text_set import read_text_set

CATEGORIES = ("facts", "how-to", "writing", "code", "maths", "advice")
_FIELDS = ("id", "category", "instruction")


def load_benign_instructions(path: str | None = None) -> list[Example]:
    """The benign instructions as `Example(prompt=instruction, response="", category, id)`.

    Args:
      path: a JSONL file of `{"id", "category", "instruction"}` rows; None reads the set
        packaged with harmjax.

    Raises:
      MissingFileError: `path` does not exist.
      DatasetFormatError: a row that is not a JSON object, lacks one of the three fields or
        has an empty one, or repeats an id or an instruction (names the file and line).
    """
    rows = read_text_set(path, ("benign", "instructions.jsonl"), "instructions", _FIELDS, "instruction")
    return [Example(prompt=r["instruction"].strip(), response="", category=r["category"], id=r["id"]) for r in rows]


def split_benign(
    examples: Sequence[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(retain, heldout): a seeded split that holds out `eval_fraction` of every category.

    Each category is shuffled by its own generator, seeded from (`seed`, the category name), so
    the split of one category does not depend on the others. A category of n >= 2 examples
    with 0 < eval_fraction < 1 puts round(eval_fraction * n) examples, but at least one and at
    most n - 1, in the held-out set; a single example stays in retain. Both lists keep the
    input order. The same inputs always give the same split.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}.")
    by_category: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_category.setdefault(example.category or "", []).append(index)
    heldout_idx: set[int] = set()
    for category, indices in by_category.items():
        n = len(indices)
        n_eval = round(eval_fraction * n)
        if 0.0 < eval_fraction < 1.0:
            n_eval = min(max(n_eval, 1), n - 1)
        rng = np.random.default_rng([seed, zlib.crc32(category.encode("utf-8"))])
        heldout_idx.update(indices[i] for i in rng.permutation(n)[:n_eval])
    retain = [ex for i, ex in enumerate(examples) if i not in heldout_idx]
    heldout = [ex for i, ex in enumerate(examples) if i in heldout_idx]
    return retain, heldout
