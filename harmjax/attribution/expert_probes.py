"""Probed grouped matmuls: per-expert gradient statistics of MoE expert weights.

The MoE block (`harmjax.model.moe`) computes each expert matrix's product as one
`jax.lax.ragged_dot` over tokens sorted by expert. When its weight leaves are probes
(`ProbedWeight`), it calls `grouped_dot` here instead, whose backward rule adds the grouped
matmul's own weight gradient, per expert, to the probes' float32 accumulators (see
`harmjax.attribution.probes` for why the statistic is the accumulator's cotangent):
  signed: G_e = sum over tokens routed to e of x_t g_t^T (one transposed ragged_dot);
  abs:    A_e = sum_i |sum over example i's tokens routed to e of x_t g_t^T|, from per-(expert,
    example) groups: tokens sorted by expert are already in example order, so the groups of a
    chunk of examples are contiguous. Each chunk of `chunk` examples is one transposed
    ragged_dot over all rows with experts * (chunk + 2) groups (the rows before and after the
    chunk form two discarded groups per expert): FLOPs of one full weight gradient per chunk
    and a transient (experts, chunk + 2, in, out) float32 block. This is the costly kind.
Per-expert leaves ((out, in), HF Linear) are stacked (experts, out, in) for the matmul; gpt-oss'
fused leaves are already (experts, in, out).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def grouped_dot(x: jax.Array, probes, group_sizes: jax.Array, rows: jax.Array, batch: int) -> jax.Array:
    """`ragged_dot(x, W)` over probed expert weights (a list of per-expert probes or one 3-D
    probe) with the accumulating backward rule; `rows` is each sorted row's example index."""
    per_expert = isinstance(probes, list)
    first = probes[0] if per_expert else probes
    if per_expert:
        weight = jnp.stack([p.weight for p in probes])
        if first.mode == "both":
            acc = tuple(jnp.stack([p.acc[j] for p in probes]) for j in range(2))
        else:
            acc = jnp.stack([p.acc for p in probes])
    else:
        weight, acc = first.weight, first.acc
    return _probed_ragged(x, weight, acc, group_sizes, rows, first.mode, first.chunk, per_expert, batch)


def _orient(w: jax.Array, transposed: bool) -> jax.Array:
    return w.swapaxes(1, 2) if transposed else w


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _probed_ragged(x, weight, acc, group_sizes, rows, mode, chunk, transposed, batch):
    del acc, rows
    return jax.lax.ragged_dot(x, _orient(weight, transposed).astype(x.dtype), group_sizes)


def _fwd(x, weight, acc, group_sizes, rows, mode, chunk, transposed, batch):
    out = _probed_ragged(x, weight, acc, group_sizes, rows, mode, chunk, transposed, batch)
    return out, (x, weight, acc, group_sizes, rows)


def _weight_grad(x32, g32, sizes, groups: int, shape) -> jax.Array:
    """(groups, in, out) float32: sum over each group's rows of x_t g_t^T."""
    spec = jax.ShapeDtypeStruct((groups,) + shape, jnp.float32)
    (dw,) = jax.linear_transpose(lambda w: jax.lax.ragged_dot(x32, w, sizes), spec)(g32)
    return dw


def _bwd(mode, chunk, transposed, batch, residuals, g):
    x, weight, acc, sizes, rows = residuals
    w = _orient(weight, transposed).astype(x.dtype)
    (dx,) = jax.linear_transpose(lambda x_: jax.lax.ragged_dot(x_, w, sizes), x)(g)
    experts, k, n = w.shape
    x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
    signed = abs_sum = None
    if mode in ("signed", "both"):
        signed = _orient(_weight_grad(x32, g32, sizes, experts, (k, n)), transposed)
    if mode in ("abs", "both"):
        expert = jnp.repeat(jnp.arange(experts), sizes, total_repeat_length=x.shape[0])
        for start in range(0, batch, chunk):
            c = min(chunk, batch - start)
            local = jnp.clip(rows - start, -1, c) + 1  # 0: before the chunk, c + 1: after it
            gid = expert * (c + 2) + local
            sizes2 = jnp.bincount(gid, length=experts * (c + 2)).astype(jnp.int32)
            per = _weight_grad(x32, g32, sizes2, experts * (c + 2), (k, n)).reshape(experts, c + 2, k, n)
            part = jnp.abs(per[:, 1 : c + 1]).sum(1)
            abs_sum = part if abs_sum is None else abs_sum + part
        abs_sum = _orient(abs_sum, transposed)
    if mode == "signed":
        new_acc = acc + signed
    elif mode == "abs":
        new_acc = acc + abs_sum
    else:
        new_acc = (acc[0] + abs_sum, acc[1] + signed)
    return dx, None, new_acc, None, None


_probed_ragged.defvjp(_fwd, _bwd)
