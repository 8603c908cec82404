"""Device-memory preflight: a scan or fine-tuning job that cannot fit fails before its first
batch, with one line naming the bytes needed, the bytes available and the knobs to turn.

An out-of-memory error from XLA comes minutes into a 32B job (after loading and compiling),
as a long allocator dump. Here the step is lowered and compiled once up front and XLA's own
estimate of the program's footprint, `compiled.memory_analysis()`, is compared with what each device
has free:

  needed    = arguments + outputs + temporaries - donated (aliased) bytes, per device
  available = bytes_limit - bytes_in_use + the arguments already resident on that device

(resident arguments, e.g. the params, are in both `bytes_in_use` and `arguments`). The
compilation is not wasted: the persistent compilation cache the launchers turn on serves the
job's own call (checked on CPU: the call adds no cache entry), and callers keep the estimate
per program and shape, so repeated scans compile for the check once. On backends without
memory statistics (CPU) the check is skipped unless a limit is given:
`limit_bytes`, or the environment variable HARMJAX_DEVICE_MEMORY_LIMIT (bytes), which also
caps accelerators (e.g. to leave room for another job on the card).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable
from typing import Any

import jax

from harmjax.errors import DeviceMemoryError
from harmjax.io.disk_space import human_bytes

LIMIT_ENV = "HARMJAX_DEVICE_MEMORY_LIMIT"


def memory_limit(limit_bytes: int | None = None) -> int | None:
    """The memory cap to check against: `limit_bytes`, else $HARMJAX_DEVICE_MEMORY_LIMIT, else None."""
    if limit_bytes:
        return int(limit_bytes)
    env = os.environ.get(LIMIT_ENV, "").strip()
    if not env:
        return None
    try:
        return int(float(env))
    except ValueError:
        raise ValueError(f"{LIMIT_ENV}={env!r} is not a number of bytes.") from None


def preflight_wanted(devices: Iterable[Any], limit_bytes: int | None = None) -> bool:
    """Whether a check can say anything: a limit is set, or a device reports memory stats."""
    return memory_limit(limit_bytes) is not None or any(_stats(d) for d in devices)


def _stats(device) -> dict[str, int] | None:
    try:
        return device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None


def peak_bytes(devices: Iterable[Any]) -> int | None:
    """The largest `peak_bytes_in_use` over `devices` since the process started (None where no
    device reports memory stats, e.g. CPUs)."""
    peaks = [(_stats(d) or {}).get("peak_bytes_in_use") for d in devices]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def program_bytes(compiled) -> int:
    """Per-device bytes a compiled program needs: arguments + outputs + temporaries - aliased."""
    m = compiled.memory_analysis()
    if m is None:
        return 0
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def resident_bytes(tree: Any, device) -> int:
    """Bytes of `tree`'s arrays that already sit on `device` (its addressable shards there)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
    return total


def available_bytes(device, resident: int, limit_bytes: int | None = None) -> tuple[int, str] | None:
    """(bytes free for a program whose resident arguments take `resident` bytes on `device`,
    how that was found), or None when nothing is known (no stats, no limit)."""
    stats, limit = _stats(device), memory_limit(limit_bytes)
    if stats is None and limit is None:
        return None
    in_use = int(stats.get("bytes_in_use", 0)) if stats else resident
    cap = int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None
    if limit is not None:
        cap = limit if cap is None else min(cap, limit)
    if cap is None:
        return None
    source = f"limit {human_bytes(cap)}, in use {human_bytes(in_use)}" if stats else \
        f"limit {human_bytes(cap)}, no device statistics"
    return cap - in_use + resident, source


def _live_note(device, resident: int) -> str:
    """Where the memory in use goes: the program's own resident arguments, the other live
    arrays, and what neither accounts for (allocator fragmentation, buffers of other
    programs or libraries)."""
    if _stats(device) is None:
        return ""
    live = 0
    for a in jax.live_arrays():
        try:
            live += sum(s.data.nbytes for s in a.addressable_shards if s.device == device)
        except RuntimeError:  # deleted while we looked
            continue
    return f", of which arguments {human_bytes(resident)}, other live arrays {human_bytes(max(0, live - resident))}"


def check_fits(needed: int, what: str, args: Any, devices: Iterable[Any], knobs: str,
               limit_bytes: int | None = None) -> None:
    """Raises DeviceMemoryError (one line) when a program needing `needed` bytes per device
    (`program_bytes`) exceeds what any of `devices` has available. `args`: the program's arguments already on the devices
    (their bytes count as available, see the module docstring). `knobs`: what the user can
    change, named in the message."""
    for device in devices:
        resident = resident_bytes(args, device)
        found = available_bytes(device, resident, limit_bytes)
        if found is None:
            continue
        available, source = found
        if needed > available:
            # Arrays waiting for Python's cycle collector still count as in use (a resumed
            # 32B experiment was refused by 1 GiB right after loading); collect, then decide.
            gc.collect()
            available, source = available_bytes(device, resident, limit_bytes) or found
        if needed > available:
            fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "unset (JAX default 0.75)")
            raise DeviceMemoryError(
                f"{what} needs {needed:,} B ({human_bytes(needed)}) per device but {device} has {available:,} B "
                f"({human_bytes(available)}) available [{source}{_live_note(device, resident)}]; change {knobs} "
                f"(smaller batch, remat on, a mesh over "
                f"more devices) or XLA_PYTHON_CLIENT_MEM_FRACTION (now {fraction}). Finished work is kept."
            )
