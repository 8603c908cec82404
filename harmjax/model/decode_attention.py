"""Single-token (decode) attention over a KV cache: a Pallas flash-decoding kernel for GPUs.

Why: XLA lowers decode attention (one query per row against the (batch, kv_heads, slots,
head_dim) cache) to batched matmuls with M = query heads per KV head (4 for Llama-3-8B) and
reads every slot, written or not. This kernel reads the cache in its native layout, only the
blocks inside each row's valid range, with an online softmax. On an H200 at the batch-64
decode shapes of an 8B model it takes the step from 6.47 to 6.24 ms (with fused projections,
6.06 to 5.85 ms); `benchmarks/decode_kernel_sweep.py` has the tilings tried.

The valid keys of a decode row are one contiguous range (left padding, then the causal
prefix, optionally cut by a sliding window), so the decoder's boolean mask converts exactly
to a (start, end) pair per row.

Grid: (batch * kv_heads, splits). Each program holds the row's query heads of one KV group,
padded to 16 (the smallest MMA tile), in registers; loops over `block_k`-slot blocks of its
split that intersect [start, end); keeps float32 running max, sum and output. With one split
per row (the default, fastest in the sweep) it writes the normalized output; with several
(flash-decoding proper) it writes per-split sums and statistics, merged in XLA. Inputs stay
in the cache dtype (bf16/f16) and both dots accumulate in float32.

Used by `harmjax.model.layers.attention` on GPUs whenever `kernel_applicable` holds;
HARMJAX_DECODE_KERNEL=0 turns it off. XLA does not partition a pallas_call, so with several
devices the kernel runs per shard under `jax.shard_map` over the context mesh (`jax.set_mesh`,
which the sampler sets): rows split over the batch axes and KV heads over `tensor`, exactly
as the cache is sharded. Without a context mesh, or when the batch or the KV heads do not
divide it, several devices take the XLA path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from harmjax.sharding import active_axes, spec_entry

HEADS_TILE = 16  # query heads per program, padded: the smallest MMA tile
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tiling of the kernel.

    block_k: cache slots per inner step (a power of two, >= 16).
    split: slots per program; None for the whole row, which writes the normalized output
      directly (no merge pass). Otherwise a multiple of block_k dividing the cache length.
    num_warps, num_stages: Triton's launch and software-pipelining parameters.
    mma: True computes both products as tensor-core dots over the query heads padded to 16
      rows; False as broadcast multiply-reduce in float32 on the CUDA cores over the query
      heads padded only to a power of two (no padding at all for 1, 2, 4, 8 or 16 heads).
    """

    block_k: int = 64
    split: int | None = None
    num_warps: int = 4
    num_stages: int = 2
    mma: bool = True


DEFAULT_CONFIG = KernelConfig()


def kernel_applicable(q: jax.Array, k: jax.Array, softcap: float | None, config: KernelConfig | None = None) -> bool:
    """Whether the kernel may serve this call: enabled (HARMJAX_DECODE_KERNEL, see `mode`),
    GPU backend, one device or a context mesh the batch and KV heads divide, one query token,
    no soft-cap, a 16-bit cache whose length the tiling divides, at most 16 query heads per
    KV head. In "interpret" mode any backend and float dtype qualify."""
    kind = mode()
    if kind == "off":
        return False
    config = config or DEFAULT_CONFIG
    groups = q.shape[2] // k.shape[1]
    slots = k.shape[2]
    split = config.split or slots
    compiled = kind == "on"
    return (
        (not compiled or jax.default_backend() == "gpu")
        and (jax.device_count() == 1 or _shard_specs(q, k) is not None)
        and q.shape[1] == 1
        and not softcap
        and (not compiled or k.dtype in (jnp.bfloat16, jnp.float16))
        and q.dtype == k.dtype
        and slots % split == 0
        and split % config.block_k == 0
        and groups <= HEADS_TILE
    )


def _shard_specs(q: jax.Array, k: jax.Array):
    """(mesh, batch spec, kv-head spec) for running the kernel per shard over the context
    mesh, or None when there is no multi-device context mesh or the shapes do not divide it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    batch_axes, kv_axes = active_axes("batch", mesh), active_axes("kv_heads", mesh)
    if q.shape[0] % math.prod(mesh.shape[a] for a in batch_axes) or k.shape[1] % math.prod(
        mesh.shape[a] for a in kv_axes
    ):
        return None
    return mesh, spec_entry(batch_axes), spec_entry(kv_axes)


def mode() -> str:
    """The environment switch HARMJAX_DECODE_KERNEL: "1" (default) -> "on", the compiled
    kernel where it applies; "0" -> "off", always the XLA path; "interpret" -> the kernel in
    Pallas' interpreter on any backend (slow; for debugging and CPU tests)."""
    value = os.environ.get("HARMJAX_DECODE_KERNEL", "1")
    if value not in ("0", "1", "interpret"):
        raise ValueError(f"HARMJAX_DECODE_KERNEL must be 0, 1 or interpret, got {value!r}.")
    return {"0": "off", "1": "on", "interpret": "interpret"}[value]


def valid_range(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(start, end) int32 per row from a (batch, 1, keys) bool mask whose True entries are
    contiguous: start = first True, end = last True + 1 (start = end when none)."""
    m = mask[:, 0, :]
    keys = m.shape[-1]
    idx = jnp.arange(keys, dtype=jnp.int32)
    start = jnp.min(jnp.where(m, idx, keys), axis=-1)
    end = jnp.max(jnp.where(m, idx + 1, 0), axis=-1)
    return start.astype(jnp.int32), jnp.maximum(end, start).astype(jnp.int32)


def heads_tile(groups: int, config: KernelConfig) -> int:
    """Rows of the query tile: 16 for tensor-core dots, else the next power of two."""
    return HEADS_TILE if config.mma else pl.next_power_of_2(groups)


def _kernel(q_ref, k_ref, v_ref, start_ref, end_ref, *out_refs, scale: float, block_k: int, split: int, mma: bool):
    lo = pl.program_id(1) * split
    start = jnp.maximum(start_ref[()], lo)
    end = jnp.minimum(end_ref[()], lo + split)
    first = (start - lo) // block_k
    last = jnp.where(end > start, (end - lo + block_k - 1) // block_k, first)
    q = q_ref[...]  # (tile, head_dim), cache dtype
    q32 = None if mma else q.astype(jnp.float32)  # the multiply-reduce form's operand
    tile = q.shape[0]
    offsets = jnp.arange(block_k, dtype=jnp.int32)

    def body(block, carry):
        acc, m_prev, l_prev = carry
        sl = pl.ds(pl.multiple_of(block * block_k, block_k), block_k)
        k = k_ref[sl, :]
        if mma:
            s = plgpu.dot(q, k, trans_b=True) * scale  # (tile, block_k) float32
        else:
            s = jnp.sum(q32[:, None, :] * k.astype(jnp.float32)[None, :, :], axis=-1) * scale
        pos = lo + block * block_k + offsets
        s = jnp.where(((pos >= start) & (pos < end))[None, :], s, _NEG)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next[:, None])
        v = v_ref[sl, :]
        if mma:
            pv = plgpu.dot(p.astype(v.dtype), v)
        else:
            pv = jnp.sum(p[:, :, None] * v.astype(jnp.float32)[None, :, :], axis=1)
        acc = acc * correction[:, None] + pv
        return acc, m_next, l_prev * correction + p.sum(axis=-1)

    d = q.shape[-1]
    init = (
        jnp.zeros((tile, d), jnp.float32),
        jnp.full((tile,), _NEG, jnp.float32),
        jnp.zeros((tile,), jnp.float32),
    )
    acc, m, l = jax.lax.fori_loop(first, last, body, init)
    if len(out_refs) == 1:  # whole row: the final, normalized output
        (o_ref,) = out_refs
        o_ref[...] = (acc / jnp.maximum(l, 1e-30)[:, None]).astype(o_ref.dtype)
    else:  # one split: unnormalized sums and their statistics, merged outside
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l


def prepare_inputs(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, config: KernelConfig):
    """The kernel's operands: per (batch, kv head) row, its query heads padded to the tile,
    its keys and values (free reshapes of the cache), and its valid slot range."""
    b, _, h, d = q.shape
    kv, slots = k.shape[1], k.shape[2]
    groups, rows = h // kv, b * kv
    tile = heads_tile(groups, config)
    qg = q.reshape(rows, groups, d)
    if tile > groups:
        qg = jnp.pad(qg, ((0, 0), (0, tile - groups), (0, 0)))
    start, end = valid_range(mask)
    return qg, k.reshape(rows, slots, d), v.reshape(rows, slots, d), jnp.repeat(start, kv), jnp.repeat(end, kv)


def kernel_call(qg, kr, vr, start, end, scale: float, config: KernelConfig, interpret: bool = False):
    """The pallas_call on prepared operands (see `prepare_inputs`): the (rows, tile, d)
    output for a whole-row tiling, else the per-split (sums, max, denominators)."""
    rows, tile, d = qg.shape
    slots = kr.shape[1]
    split = config.split or slots
    splits = slots // split
    in_specs = [
        pl.BlockSpec((None, tile, d), lambda i, j: (i, 0, 0)),
        pl.BlockSpec((None, split, d), lambda i, j: (i, j, 0)),
        pl.BlockSpec((None, split, d), lambda i, j: (i, j, 0)),
        pl.BlockSpec((None,), lambda i, j: (i,)),
        pl.BlockSpec((None,), lambda i, j: (i,)),
    ]
    if splits == 1:
        out_specs = [pl.BlockSpec((None, tile, d), lambda i, j: (i, 0, 0))]
        out_shape = [jax.ShapeDtypeStruct((rows, tile, d), qg.dtype)]
    else:
        out_specs = [
            pl.BlockSpec((None, None, tile, d), lambda i, j: (j, i, 0, 0)),
            pl.BlockSpec((None, None, tile), lambda i, j: (j, i, 0)),
            pl.BlockSpec((None, None, tile), lambda i, j: (j, i, 0)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((splits, rows, tile, d), jnp.float32),
            jax.ShapeDtypeStruct((splits, rows, tile), jnp.float32),
            jax.ShapeDtypeStruct((splits, rows, tile), jnp.float32),
        ]
    return pl.pallas_call(
        functools.partial(_kernel, scale=float(scale), block_k=config.block_k, split=split, mma=config.mma),
        grid=(rows, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="harmjax_decode_attention",
    )(qg, kr, vr, start, end)


def pallas_decode_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, config: KernelConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Decode attention with the flash-decoding kernel.

    q: (batch, 1, heads, head_dim); k, v: (batch, kv_heads, slots, head_dim);
    mask: (batch, 1, slots) bool with contiguous True entries. Returns (batch, 1, heads*head_dim)
    in q's dtype. `config` defaults to the module's DEFAULT_CONFIG, read at trace time.
    """
    config = config or DEFAULT_CONFIG
    sharded = _shard_specs(q, k)
    if sharded is not None:
        mesh, batch, kv = sharded
        local = functools.partial(_local_attention, scale=scale, config=config, interpret=interpret)
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(batch, None, kv, None), P(batch, kv, None, None), P(batch, kv, None, None), P(batch, None, None)),
            out_specs=P(batch, None, kv),
            check_vma=False,
        )(q, k, v, mask)
    return _local_attention(q, k, v, mask, scale, config, interpret)


def _local_attention(q, k, v, mask, scale, config, interpret):
    b, _, h, d = q.shape
    groups = h // k.shape[1]
    outs = kernel_call(*prepare_inputs(q, k, v, mask, config), scale, config, interpret)
    if len(outs) == 1:
        out = outs[0]
        if out.shape[1] == groups:  # nothing padded: already (rows, groups, d)
            return out.reshape(b, 1, h * d)
    else:
        # Merge the splits: rescale each split's sums to the global max.
        o, m, l = outs
        m_all = m.max(axis=0)
        w = jnp.exp(m - m_all[None])
        out = (o * w[..., None]).sum(0) / jnp.maximum((l * w).sum(0), 1e-30)[..., None]
    return out[:, :groups].reshape(b, 1, h * d).astype(q.dtype)
