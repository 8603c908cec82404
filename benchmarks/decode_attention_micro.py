"""Decode attention alone, at Llama-3.1-8B batch-64 shapes: how fast XLA reads the KV cache.

One query token per row against a (batch 64, 8 kv heads, 384 slots, head_dim 128) bf16 cache,
4 query heads per kv head, over 32 layers (`lax.map`). Variants: XLA dots (what the decoder
runs), dots with a float32 value product, and a broadcast-multiply-reduce formulation.
Reports time for the 32 layers and the K+V bytes read per second.

  PYTHONPATH=. python benchmarks/decode_attention_micro.py
"""

import time

import jax
import jax.numpy as jnp

B, KV, G, SLOTS, D, LAYERS = 64, 8, 4, 384, 128, 32


def dot_attn(q, k, v):
    scores = jnp.einsum("bkgd,bksd->bkgs", q, k, preferred_element_type=jnp.float32)
    return jnp.einsum("bkgs,bksd->bkgd", jax.nn.softmax(scores, -1).astype(v.dtype), v)


def dot_f32_values(q, k, v):
    scores = jnp.einsum("bkgd,bksd->bkgs", q, k, preferred_element_type=jnp.float32)
    return jnp.einsum("bkgs,bksd->bkgd", jax.nn.softmax(scores, -1), v.astype(jnp.float32)).astype(v.dtype)


def reduce_attn(q, k, v):
    scores = jnp.sum(q[:, :, :, None, :].astype(jnp.float32) * k[:, :, None].astype(jnp.float32), -1)
    probs = jax.nn.softmax(scores, -1)
    return jnp.sum(probs[..., None] * v[:, :, None].astype(jnp.float32), 3).astype(v.dtype)


def main():
    key = jax.random.key(0)
    q = jax.random.normal(key, (LAYERS, B, KV, G, D), jnp.bfloat16)
    k = jax.random.normal(key, (LAYERS, B, KV, SLOTS, D), jnp.bfloat16)
    v = jax.random.normal(key, (LAYERS, B, KV, SLOTS, D), jnp.bfloat16)
    for name, fn in [("dot", dot_attn), ("reduce", reduce_attn), ("dot_f32", dot_f32_values)]:
        run = jax.jit(lambda q, k, v, fn=fn: jax.lax.map(lambda a: fn(*a), (q, k, v)))
        run(q, k, v).block_until_ready()
        start = time.perf_counter()
        for _ in range(20):
            out = run(q, k, v)
        out.block_until_ready()
        seconds = (time.perf_counter() - start) / 20
        print(f"{name}: {seconds * 1e3:.3f} ms for {LAYERS} layers; K+V {2 * k.nbytes / 1e9:.2f} GB "
              f"read at {2 * k.nbytes / seconds / 1e12:.2f} TB/s", flush=True)


if __name__ == "__main__":
    main()
