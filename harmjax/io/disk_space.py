"""Checks that a large write fits on its disk before it starts.

A GGUF conversion or a scan of score trees that runs out of disk fails minutes or hours in,
with an OS error that does not say how much room the job needed. These checks fail at once,
naming the directory, the bytes needed and the bytes free, and leave everything already on
disk untouched.
"""

from __future__ import annotations

import os
import shutil

from harmjax.errors import DiskSpaceError

# Room left over for metadata, tokenizer files and the file system's own overhead.
_MARGIN = 1.02


def free_bytes(directory: str) -> int:
    """Free bytes on the file system that holds `directory` (or its nearest existing parent)."""
    path = os.path.abspath(directory)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return shutil.disk_usage(path).free


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; for messages."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def require_free_space(directory: str, needed: int, what: str, hint: str = "") -> None:
    """Raises DiskSpaceError when `directory`'s disk has less than `needed` bytes free.

    Args:
      directory: where the write goes (need not exist yet).
      needed: bytes the write will add.
      what: the write, for the message ("converting model.gguf").
      hint: what the user can do instead, appended to the message.
    """
    free = free_bytes(directory)
    if free < needed * _MARGIN:
        message = (
            f"{what} needs about {human_bytes(needed)} in {directory}, but its disk has only "
            f"{human_bytes(free)} free."
        )
        raise DiskSpaceError(f"{message} {hint}".strip())
