"""Where selection's programs run and how they are compiled: shardings, placement checks,
jitting with the scores' own output sharding, and compiling a model's few distinct programs
side by side on threads before the first leaf runs (`precompile`). See docs/design.md
"Selection" and docs/measurements.md "Selection"."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

_COMPILE_THREADS = 8


def sharding_of(x: Any):
    """The sharding of a jax.Array, None for host (NumPy) arrays."""
    return x.sharding if isinstance(x, jax.Array) else None


def replicated_like(x: Any):
    """A replicated NamedSharding over `x`'s mesh (for small outputs every process reads:
    counts, packed masks, gathered values), or None when `x` has no mesh."""
    s = sharding_of(x)
    return NamedSharding(s.mesh, P()) if isinstance(s, NamedSharding) else None


def colocate(x: Any, sharding: Any) -> Any:
    """`x` moved to `sharding` when it lives on another set of devices (retain scores beside
    harm scores): jit rejects arguments committed to different device sets."""
    if sharding is not None and isinstance(x, jax.Array) and x.sharding.device_set != sharding.device_set:
        return jax.device_put(x, sharding)
    return x


def on_host(x: Any) -> bool:
    """A NumPy array, or a jax.Array on one CPU device: selection can run in NumPy."""
    if isinstance(x, np.ndarray):
        return True
    return isinstance(x, jax.Array) and len(x.sharding.device_set) == 1 and \
        next(iter(x.sharding.device_set)).platform == "cpu"


def on_cpu(x: Any) -> bool:
    """A host array, or a jax.Array on CPU devices (one or several)."""
    return not isinstance(x, jax.Array) or next(iter(x.sharding.device_set)).platform == "cpu"


def jit_to(fn, out_sharding):
    """`jax.jit(fn)` whose outputs take `out_sharding` (the scores' own); with None (host
    inputs) placement is left to jax."""
    return jax.jit(fn) if out_sharding is None else jax.jit(fn, out_shardings=out_sharding)


def signature(*xs: Any) -> tuple:
    """What a jitted call's compilation depends on, per array argument (shape, dtype,
    sharding; None for a missing argument): the key that groups `precompile` jobs."""
    return tuple(None if x is None else (tuple(x.shape), str(x.dtype), sharding_of(x)) for x in xs)


def precompile(jobs: Mapping[Any, tuple[Any, tuple]]) -> None:
    """Compiles jitted calls before they run, side by side on threads: {signature: (jitted
    function, example arguments)}. XLA releases the GIL while it compiles, and jit's own call
    path then finds each compilation in its cache. A model's leaves need a few distinct small
    programs (one per leaf shape), which compile faster together than one after another."""
    if len(jobs) < 2:
        return
    with ThreadPoolExecutor(min(len(jobs), _COMPILE_THREADS)) as pool:
        list(pool.map(lambda job: job[0].lower(*job[1]).compile(), jobs.values()))


def wait_if_collective(x: jax.Array) -> jax.Array:
    """Waits for a leaf's mask when it spans several devices.

    Each leaf's program all-reduces inside its bisection loops; XLA:CPU runs the devices of
    every in-flight program on one small thread pool and deadlocks (a rendezvous timeout)
    when many such programs are queued at once. On accelerators the wait costs microseconds
    against a leaf's dozens of passes over its scores.
    """
    if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
        x.block_until_ready()
    return x
