"""The refusal texts shipped with harmjax (`harmjax/data/refusals/refusals.jsonl`, written for
this project; see `refusals/README.md`): the targets of the refusal tuning in
`harmjax.experiments.refusal`."""

from __future__ import annotations

import dataclasses

from harmjax.data.text_set import read_text_set


@dataclasses.dataclass(frozen=True)
class Refusal:
    """One refusal text with its id and style (apology, direct, reason, alternative, short)."""

    id: str
    style: str
    text: str


def load_refusals(path: str | None = None) -> list[Refusal]:
    """The refusal texts, in file order.

    Args:
      path: a JSONL file of `{"id", "text"}` rows (optional "style"); None reads the set
        packaged with harmjax.

    Raises:
      MissingFileError: `path` does not exist, or the package data is missing.
      DatasetFormatError: a row that is not an object, an empty id or text, a repeated id or
        text (names the file and line), or an empty file.
    """
    rows = read_text_set(path, ("refusals", "refusals.jsonl"), "refusal texts", ("id", "text"), "text")
    return [Refusal(id=r["id"], style=str(r.get("style", "")), text=r["text"].strip()) for r in rows]
