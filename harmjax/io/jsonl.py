"""Append-only JSONL files: the storage of every resumable per-item job (generation, scoring).

A job opens its output with `JsonlWriter`, skips the keys in `.done`, and writes each finished
item at once (flushed and fsynced), so a killed job loses at most the item in flight and a
rerun continues where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from absl import logging

from harmjax.errors import HarmjaxError, MissingFileError


class JsonlFormatError(HarmjaxError, ValueError):
    """A JSONL file has a line that is not a JSON object (other than a truncated last line)."""


def json_lines(text: str, source: str, error: type[Exception] = JsonlFormatError) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of JSONL `text`.

    A line that is not JSON raises `error` (a dataset's own error class) as
    "<source>, line N: not valid JSON (...)". Checking the values' shape is the caller's.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{source}, line {number}: not valid JSON ({e.msg}).") from None


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Reads a JSONL file into a list of dicts.

    A malformed line raises `JsonlFormatError` naming the file and line number, except an
    unterminated final line (what a killed writer leaves), which is dropped with a warning.
    """
    if not os.path.isfile(path):
        raise MissingFileError(f"No JSONL file at {path}.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    truncated_tail = not text.endswith("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if truncated_tail and number == len(lines):
                logging.warning("%s: dropping a truncated last line (%d chars).", path, len(line))
                continue
            raise JsonlFormatError(f"{path}, line {number}: not valid JSON ({e.msg}).") from None
        if not isinstance(record, dict):
            raise JsonlFormatError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}.")
        records.append(record)
    return records


class JsonlWriter:
    """Appends records to a JSONL file, remembering which keys are already done.

    Use:
        with JsonlWriter(path) as out:
            for item in items:
                if item["id"] in out.done:
                    continue
                out.write({"id": item["id"], ...})

    A truncated last line from an interrupted run is cut off on open, so the file stays valid.
    On a multi-host run every process computes the same records but only process 0 writes
    (all processes read `.done` from the shared file, so they skip the same items).
    """

    def __init__(self, path: str, key: str = "id"):
        self.path = path
        self.key = key
        self.done: set[Any] = set()
        self._file = None

    def __enter__(self) -> "JsonlWriter":
        from harmjax import distributed

        self._writer = distributed.is_writer()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if os.path.isfile(self.path):
            records = read_jsonl(self.path)
            if self._writer:
                self._drop_truncated_tail()
            for record in records:
                if self.key not in record:
                    raise JsonlFormatError(f"{self.path}: a record has no {self.key!r} field: {str(record)[:200]}")
                self.done.add(record[self.key])
        self._file = open(self.path, "a", encoding="utf-8") if self._writer else None
        return self

    def _drop_truncated_tail(self) -> None:
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Appends one record (must carry the key field) and makes it durable."""
        if self.key not in record:
            raise ValueError(f"Record has no {self.key!r} field: {str(record)[:200]}")
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        self.done.add(record[self.key])

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if exc[0] is None:
            from harmjax import distributed

            # The other processes read the file next: wait until process 0 has written it.
            distributed.barrier(f"wrote {self.path}")
