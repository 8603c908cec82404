"""The over-refusal prompt set shipped with harmjax (`harmjax/data/over_refusal/prompts.jsonl`,
written for this project; see `over_refusal/README.md`): harmless prompts that only sound
harmful, in the kinds of XSTest (Röttger et al. 2024), and unsafe "contrast" prompts of the
same surface form. A model that refuses everything fails the safe half; one that refuses
nothing fails the unsafe half."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from harmjax.data.records import DatasetFormatError
from harmjax.data.text_set import read_text_set

KINDS = ("homonyms", "figurative", "safe_targets", "safe_contexts", "definitions", "nonsense_groups",
         "historical_events", "public_figures", "fictional_privacy")
LABELS = ("safe", "unsafe")
_FIELDS = ("id", "kind", "prompt", "label")


@dataclasses.dataclass(frozen=True)
class OverRefusalPrompt:
    """One prompt: its id, kind, text, label ("safe" or "unsafe") and, for an unsafe contrast,
    the id of the safe prompt whose surface form it shares ("" otherwise)."""

    id: str
    kind: str
    prompt: str
    label: str
    contrast_of: str = ""


def load_over_refusal(path: str | None = None) -> list[OverRefusalPrompt]:
    """The over-refusal prompts, in file order.

    Args:
      path: a JSONL file of `{"id", "kind", "prompt", "label"}` rows (optional "contrast_of"
        on unsafe rows); None reads the set packaged with harmjax.

    Raises:
      MissingFileError: `path` does not exist, or the package data is missing.
      DatasetFormatError: a row that is not an object, an empty field, a label other than
        "safe" / "unsafe", a repeated id or prompt, a "contrast_of" on a safe row or one that
        names no safe prompt of the same kind in the file (each names the file and line), or
        an empty file.
    """
    where_of: dict[str, str] = {}

    def check(row: dict[str, Any], where: str) -> None:
        if row["label"] not in LABELS:
            raise DatasetFormatError(f"{where}: label must be one of {', '.join(LABELS)} (got {row['label']!r}).")
        contrast = row.get("contrast_of")
        if contrast is not None and (not isinstance(contrast, str) or not contrast.strip()):
            raise DatasetFormatError(f"{where}: contrast_of must be a non-empty string (got {contrast!r}).")
        if contrast and row["label"] != "unsafe":
            raise DatasetFormatError(f"{where}: only an unsafe row may have contrast_of (label {row['label']!r}).")
        where_of[row["id"]] = where

    rows = read_text_set(path, ("over_refusal", "prompts.jsonl"), "over-refusal prompts", _FIELDS, "prompt", check)
    by_id = {r["id"]: r for r in rows}
    for r in rows:
        target = by_id.get(r.get("contrast_of") or "")
        if r.get("contrast_of") and (target is None or target["label"] != "safe" or target["kind"] != r["kind"]):
            raise DatasetFormatError(f"{where_of[r['id']]}: contrast_of {r['contrast_of']!r} names no safe prompt "
                                     f"of kind {r['kind']!r} in the file.")
    return [OverRefusalPrompt(id=r["id"], kind=r["kind"], prompt=r["prompt"].strip(), label=r["label"],
                              contrast_of=r.get("contrast_of") or "") for r in rows]


def over_refusal_subset(prompts: Sequence[OverRefusalPrompt], safe_per_kind: int,
                        seed: int = 0) -> list[OverRefusalPrompt]:
    """A seeded subset for small budgets: `safe_per_kind` safe prompts of each kind (all when
    0 or more than the kind has) and the unsafe contrasts of those chosen, so the subset stays
    paired. Each kind is drawn by its own generator, seeded from (`seed`, the kind), so one
    kind's draw does not depend on the others; the result keeps the input order."""
    if safe_per_kind < 0:
        raise ValueError(f"safe_per_kind must be >= 0, got {safe_per_kind}.")
    by_kind: dict[str, list[int]] = {}
    for index, p in enumerate(prompts):
        if p.label == "safe":
            by_kind.setdefault(p.kind, []).append(index)
    chosen: set[str] = set()
    for kind, indices in by_kind.items():
        n = len(indices) if not safe_per_kind else min(safe_per_kind, len(indices))
        rng = np.random.default_rng([seed, zlib.crc32(kind.encode("utf-8"))])
        chosen.update(prompts[indices[i]].id for i in rng.permutation(len(indices))[:n])
    return [p for p in prompts if p.id in chosen or (p.label == "unsafe" and p.contrast_of in chosen)]
