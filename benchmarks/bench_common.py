"""Shared by the benchmark scripts (run as `python benchmarks/<script>.py`, which puts this
folder on sys.path): the Llama-3.1-8B shape as an HF config, and the device's measured bf16
matmul rate, the MFU denominator."""

from __future__ import annotations

import time

# Llama-3.1-8B's config.json fields that fix its shape (random weights stand in for its own).
LLAMA31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
    max_position_embeddings=131072, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)


# The same shape as harmjax ModelConfig fields (benchmarks that build the config directly).
LLAMA31_8B_SHAPE = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
    max_position_embeddings=131072,
)
TINY_SHAPE = dict(
    model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=1024,
)
PROMPT_TOKENS = 64


def synthetic_examples(n: int, seq: int, vocab: int, seed: int):
    """n tokenized examples of `seq` random tokens; the last seq - 64 are the response (scored)."""
    import numpy as np

    from harmjax.data.calibration import Tokenized

    rng = np.random.default_rng(seed)
    prompt = min(PROMPT_TOKENS, seq // 4)
    loss = np.r_[np.zeros(prompt, np.int32), np.ones(seq - prompt, np.int32)]
    return [Tokenized(rng.integers(0, vocab, seq, dtype=np.int32), loss) for _ in range(n)]


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


def copy_bandwidth(gb: float, repeats: int = 10) -> dict:
    """Device-to-device copy rate: (bytes read + bytes written) / time, median of `repeats`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = int(gb * 1e9) // 4
    x = jnp.ones((n,), jnp.float32)
    copy = jax.jit(jnp.copy)  # a new buffer: one read and one write of every element
    copy(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - start)
    t = float(np.median(times))
    del x
    return {"array_bytes": 4 * n, "seconds": t, "bytes_per_s": 2 * 4 * n / t}
