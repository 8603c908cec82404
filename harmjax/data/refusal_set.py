"""The refusal texts shipped with harmjax (`harmjax/data/refusals/refusals.jsonl`, written for
this project; see `refusals/README.md`): the targets of the refusal tuning in
`harmjax.pipeline.refusal_model`."""

from __future__ import annotations

import dataclasses
import importlib.resources
import os

from harmjax.data.records import DatasetFormatError
from harmjax.errors import MissingFileError
from harmjax.io.jsonl import json_lines


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
    if path is None:
        resource = importlib.resources.files("harmjax.data").joinpath("refusals", "refusals.jsonl")
        if not resource.is_file():
            raise MissingFileError(
                f"The packaged refusal texts are missing ({resource}); the harmjax install lacks its "
                "package data (pyproject [tool.setuptools.package-data])."
            )
        text, source = resource.read_text(encoding="utf-8"), str(resource)
    else:
        if not os.path.isfile(path):
            raise MissingFileError(f"No refusal file at {path}.")
        with open(path, encoding="utf-8") as f:
            text, source = f.read(), path
    out: list[Refusal] = []
    seen_ids: dict[str, int] = {}
    seen_texts: dict[str, int] = {}
    for number, row in json_lines(text, source, DatasetFormatError):
        where = f"{source}, line {number}"
        if not isinstance(row, dict):
            raise DatasetFormatError(f"{where}: expected a JSON object, got {type(row).__name__}.")
        ident, body = row.get("id"), row.get("text")
        if not isinstance(ident, str) or not ident.strip() or not isinstance(body, str) or not body.strip():
            raise DatasetFormatError(f"{where}: each row needs non-empty string fields 'id' and 'text'.")
        # A repeat would only reweight the set; refuse it so the counts in the README stay true.
        key = " ".join(body.lower().split())
        for seen, value, what in ((seen_ids, ident, "id"), (seen_texts, key, "text")):
            if value in seen:
                raise DatasetFormatError(f"{where}: {what} repeats the one on line {seen[value]}.")
            seen[value] = number
        out.append(Refusal(id=ident, style=str(row.get("style", "")), text=body.strip()))
    if not out:
        raise DatasetFormatError(f"{source}: no refusal texts (the file is empty).")
    return out
