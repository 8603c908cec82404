"""The JSONL text sets shipped with harmjax (benign instructions, refusal texts): one reader
that finds the packaged file or a user's, and checks every row the same way."""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Callable, Sequence
from typing import Any

from harmjax.data.records import DatasetFormatError
from harmjax.errors import MissingFileError
from harmjax.io.jsonl import json_lines


def read_text_set(path: str | None, package: Sequence[str], what: str, fields: Sequence[str],
                  text_field: str, check: Callable[[dict[str, Any], str], None] | None = None) -> list[dict[str, Any]]:
    """The rows of a text set, in file order: the JSONL at `path`, or with None the one
    packaged under `harmjax/data/<package...>`.

    Every row must be a JSON object whose `fields` are non-empty strings; no id and no
    `text_field` (case and spacing ignored: they do not make a different text) may repeat, so
    a set split into training and held-out parts cannot leak a text into both. `check(row,
    where)` runs on each row after these checks (`where` is "<file>, line N", for its errors).

    Raises:
      MissingFileError: `path` does not exist, or the package data is missing.
      DatasetFormatError: a bad row (names the file and line), or an empty file.
    """
    if path is None:
        resource = importlib.resources.files("harmjax.data").joinpath(*package)
        if not resource.is_file():
            raise MissingFileError(
                f"The packaged {what} are missing ({resource}); the harmjax install lacks its "
                "package data (pyproject [tool.setuptools.package-data])."
            )
        text, source = resource.read_text(encoding="utf-8"), str(resource)
    else:
        if not os.path.isfile(path):
            raise MissingFileError(f"No {what} file at {path}.")
        with open(path, encoding="utf-8") as f:
            text, source = f.read(), path
    rows: list[dict[str, Any]] = []
    id_lines: dict[str, int] = {}
    text_lines: dict[str, int] = {}
    for number, row in json_lines(text, source, DatasetFormatError):
        where = f"{source}, line {number}"
        if not isinstance(row, dict):
            raise DatasetFormatError(f"{where}: expected a JSON object, got {type(row).__name__}.")
        for field in fields:
            value = row.get(field)
            if not isinstance(value, str) or not value.strip():
                raise DatasetFormatError(
                    f"{where}: field {field!r} must be a non-empty string (got {value!r}); "
                    f"each row needs {', '.join(fields)}."
                )
        ident = row["id"]
        if ident in id_lines:
            raise DatasetFormatError(f"{where}: id {ident!r} already used on line {id_lines[ident]}.")
        key = " ".join(row[text_field].lower().split())
        if key in text_lines:
            raise DatasetFormatError(f"{where}: {text_field} repeats the one on line {text_lines[key]}.")
        if check is not None:
            check(row, where)
        id_lines[ident], text_lines[key] = number, number
        rows.append(row)
    if not rows:
        raise DatasetFormatError(f"{source}: no {what} (the file is empty).")
    return rows
