"""Single-token (decode) attention over a KV cache: a Pallas flash-decoding kernel for GPUs.

Why: XLA lowers decode attention (one query per row against the (batch, kv_heads, slots,
head_dim) cache) to batched matmuls with M = query heads per KV head (4 for Llama-3-8B). On an
H200 at batch 64 those read the cache at about 1.1 TB/s and read every slot, written or not
(`benchmarks/decode_attention_micro.py`). This kernel reads the cache in its native layout,
only the blocks inside each row's valid range, split across thread blocks (flash-decoding),
and merges the splits with their softmax statistics.

The valid keys of a decode row are one contiguous range (left padding, then the causal
prefix, optionally cut by a sliding window), so the decoder's boolean mask converts exactly
to a (start, end) pair per row.

Grid: (batch * kv_heads, splits). Each program holds the row's query heads of one KV group,
padded to 16 (the smallest MMA tile), in registers; loops over 64-slot blocks of its split
that intersect [start, end); keeps float32 running max, sum and output; writes them for the
merge. Inputs stay in the cache dtype (bf16/f16) and both dots accumulate in float32.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK_K = 64  # slots per inner step
SPLIT = 128  # slots per program (a multiple of BLOCK_K)
HEADS_TILE = 16  # query heads per program, padded: the smallest MMA tile
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def kernel_applicable(q: jax.Array, k: jax.Array, softcap: float | None) -> bool:
    """Whether the kernel may serve this call: opt-in (HARMJAX_DECODE_KERNEL=1), GPU backend,
    one device (a pallas_call is not partitioned by XLA), one query token, no soft-cap, a
    16-bit cache whose length is a multiple of 128, at most 16 query heads per KV head."""
    if os.environ.get("HARMJAX_DECODE_KERNEL", "0") != "1":
        return False
    groups = q.shape[2] // k.shape[1]
    return (
        jax.default_backend() == "gpu"
        and jax.device_count() == 1
        and q.shape[1] == 1
        and not softcap
        and k.dtype in (jnp.bfloat16, jnp.float16)
        and q.dtype == k.dtype
        and k.shape[2] % SPLIT == 0
        and groups <= HEADS_TILE
    )


def valid_range(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(start, end) int32 per row from a (batch, 1, keys) bool mask whose True entries are
    contiguous: start = first True, end = last True + 1 (start = end when none)."""
    m = mask[:, 0, :]
    keys = m.shape[-1]
    idx = jnp.arange(keys, dtype=jnp.int32)
    start = jnp.min(jnp.where(m, idx, keys), axis=-1)
    end = jnp.max(jnp.where(m, idx + 1, 0), axis=-1)
    return start.astype(jnp.int32), jnp.maximum(end, start).astype(jnp.int32)


def _kernel(q_ref, k_ref, v_ref, start_ref, end_ref, o_ref, m_ref, l_ref, *, scale: float):
    split = pl.program_id(1)
    lo = split * SPLIT
    start = jnp.maximum(start_ref[()], lo)
    end = jnp.minimum(end_ref[()], lo + SPLIT)
    first = (start - lo) // BLOCK_K
    last = jnp.where(end > start, (end - lo + BLOCK_K - 1) // BLOCK_K, first)
    q = q_ref[...]  # (HEADS_TILE, head_dim), cache dtype
    offsets = jnp.arange(BLOCK_K, dtype=jnp.int32)

    def body(block, carry):
        acc, m_prev, l_prev = carry
        sl = pl.ds(block * BLOCK_K, BLOCK_K)
        k = k_ref[sl, :]
        s = plgpu.dot(q, k, trans_b=True) * scale  # (HEADS_TILE, BLOCK_K) float32
        pos = lo + block * BLOCK_K + offsets
        s = jnp.where(((pos >= start) & (pos < end))[None, :], s, _NEG)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next[:, None])
        v = v_ref[sl, :]
        acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_next, l_prev * correction + p.sum(axis=-1)

    init = (
        jnp.zeros(o_ref.shape, jnp.float32),
        jnp.full(m_ref.shape, _NEG, jnp.float32),
        jnp.zeros(l_ref.shape, jnp.float32),
    )
    acc, m, l = jax.lax.fori_loop(first, last, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def pallas_decode_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, interpret: bool = False
) -> jax.Array:
    """Decode attention with the flash-decoding kernel.

    q: (batch, 1, heads, head_dim); k, v: (batch, kv_heads, slots, head_dim);
    mask: (batch, 1, slots) bool with contiguous True entries. Returns (batch, 1, heads*head_dim)
    in q's dtype.
    """
    b, _, h, d = q.shape
    kv, slots = k.shape[1], k.shape[2]
    groups = h // kv
    rows = b * kv
    splits = slots // SPLIT
    start, end = valid_range(mask)
    start, end = jnp.repeat(start, kv), jnp.repeat(end, kv)
    # (batch*kv, HEADS_TILE, d): each KV group's query heads, zero-padded to the tile.
    qg = jnp.pad(q.reshape(rows, groups, d), ((0, 0), (0, HEADS_TILE - groups), (0, 0)))
    kr, vr = k.reshape(rows, slots, d), v.reshape(rows, slots, d)
    o, m, l = pl.pallas_call(
        functools.partial(_kernel, scale=float(scale)),
        grid=(rows, splits),
        in_specs=[
            pl.BlockSpec((None, HEADS_TILE, d), lambda i, j: (i, 0, 0)),
            pl.BlockSpec((None, SPLIT, d), lambda i, j: (i, j, 0)),
            pl.BlockSpec((None, SPLIT, d), lambda i, j: (i, j, 0)),
            pl.BlockSpec((None,), lambda i, j: (i,)),
            pl.BlockSpec((None,), lambda i, j: (i,)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, HEADS_TILE, d), lambda i, j: (j, i, 0, 0)),
            pl.BlockSpec((None, None, HEADS_TILE), lambda i, j: (j, i, 0)),
            pl.BlockSpec((None, None, HEADS_TILE), lambda i, j: (j, i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, rows, HEADS_TILE, d), jnp.float32),
            jax.ShapeDtypeStruct((splits, rows, HEADS_TILE), jnp.float32),
            jax.ShapeDtypeStruct((splits, rows, HEADS_TILE), jnp.float32),
        ],
        interpret=interpret,
        name="harmjax_decode_attention",
    )(qg, kr, vr, start, end)
    # Merge the splits: rescale each split's sums to the global max.
    m_all = m.max(axis=0)
    w = jnp.exp(m - m_all[None])
    out = (o * w[..., None]).sum(0) / jnp.maximum((l * w).sum(0), 1e-30)[..., None]
    return out[:, :groups].reshape(b, 1, h * d).astype(q.dtype)
