"""Shared by the benchmark scripts (run as `python benchmarks/<script>.py`, which puts this
folder on sys.path): the device's measured bf16 matmul rate, the MFU denominator."""

from __future__ import annotations

import time


def matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matmul rate of the default device (TFLOP/s) on an n x n x n product."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    for _ in range(3):
        f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12
