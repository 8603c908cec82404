"""The retain scan's per-example |gradient| sum as one fused Pallas kernel for GPUs.

The `retain` score needs, per weight matrix (out, in) of a linear map y = x W^T,
    A = sum_b |sum_t g[b, t, :]^T x[b, t, :]|          (g = dL/dy of example b)
XLA forms it as a batched matmul writing a (chunk, out, in) float32 block of per-example
gradients to memory, then a reduction reading it back: 8 bytes of traffic per element per
example against 2 * seq FLOPs, so at a few hundred tokens the step is memory bound and the
retain scan runs well below the harm scan's speed. This kernel keeps each example's
(block_o, block_i) tile in registers, adds its absolute value to a float32 running sum, and
writes every output tile once: the same FLOPs as the harm scan's gradient, no per-example
block in memory.

Grid: (out / block_o, in / block_i). Each program loops over the examples of the local batch
and, inside, over `block_t`-token slices of the sequence, accumulating the example's tile with
tensor-core dots (16-bit inputs, float32 accumulation), then adds |tile| to its sum.

The sum over t runs in `block_t` slices instead of cuBLAS's order, so results equal the XLA
path's within float32 rounding (tested against float64 in Pallas' interpreter).

XLA does not partition a pallas_call, so on a mesh the kernel runs per device under
`jax.shard_map` on the local examples, and the per-device partial sums are reduce-scattered
into the accumulator's own sharding (summed over the batch axes it is not split on). Under
tensor parallelism each device computes its own block of a column- or row-parallel weight
(nothing is reduced over `tensor`). For float32 activations (the kernel's dots would round to
TF32) or shapes the tiles do not divide, the XLA path runs.

HARMJAX_ABS_KERNEL: "auto" (default: the kernel on GPU meshes with tensor parallelism, XLA's
path elsewhere), "1" (the kernel wherever it applies), "0" (always XLA's path), "interpret"
(Pallas' interpreter on any backend, for tests). The scan step's cache (`jit_accumulate`) is
keyed on the setting.

Status (docs/measurements.md "Scans at 14B and 32B"): correct; it matches float64 and
XLA's per-example blocks within float32 rounding, alone, on the mesh, under jit(grad) and inside
whole scan steps. Under tensor parallelism it makes the retain scan faster at little or no
extra peak memory, hence the default there. Under FSDP alone it is faster too but needs more memory per
device, where XLA's path already runs close to the limit at the largest sizes, so it is opt-in
there; whole bf16 FSDP scans through it differ from XLA's only as any two programs partitioned
and rounded differently do.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import NamedSharding, PartitionSpec as P

from harmjax.sharding import active_axes, entry_axes, spec_entry


@dataclasses.dataclass(frozen=True)
class AbsKernelConfig:
    """Tiling: output tile (block_o, block_i), tokens per dot (block_t), and Triton's
    num_warps / num_stages (software pipelining of the token loop)."""

    # The fastest tiling benchmarks/abs_kernel_check.py found at Qwen2.5-32B's per-device
    # shapes on an H200 (8 x 256 tokens).
    block_o: int = 128
    block_i: int = 64
    block_t: int = 32
    num_warps: int = 4
    num_stages: int = 3


def _config_from_env() -> AbsKernelConfig:
    # "bo,bi,bt,warps,stages" (benchmarks sweep tilings through it).
    value = os.environ.get("HARMJAX_ABS_KERNEL_CONFIG", "")
    if not value:
        return AbsKernelConfig()
    fields = [int(v) for v in value.split(",")]
    if len(fields) != 5:
        raise ValueError(f"HARMJAX_ABS_KERNEL_CONFIG must be 'block_o,block_i,block_t,num_warps,num_stages', got {value!r}.")
    return AbsKernelConfig(*fields)


def mode() -> str:
    """HARMJAX_ABS_KERNEL: "auto" (default), "1" -> "on", "0" -> "off", "interpret"."""
    value = os.environ.get("HARMJAX_ABS_KERNEL", "auto")
    if value not in ("auto", "1", "0", "interpret"):
        raise ValueError(f"HARMJAX_ABS_KERNEL must be auto, 1, 0 or interpret, got {value!r}.")
    return {"auto": "auto", "1": "on", "0": "off", "interpret": "interpret"}[value]


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _plan(x: jax.Array, g: jax.Array, sharding: NamedSharding | None, config: AbsKernelConfig):
    """(mesh, batch spec entry, x / g feature spec entries, acc spec) when the kernel serves
    this call, else None.

    The accumulator (out, in) may be split over the batch axes (data, fsdp: the partial sums
    are reduce-scattered) and, on one dimension each, over other axes (tensor parallelism):
    a column-parallel weight (out split) sees g split the same way and x whole, a
    row-parallel one (in split) x split and g whole, so each device's partial sum is already
    its own block and nothing is reduced over `tensor`.
    """
    if sharding is None or not isinstance(sharding, NamedSharding):
        return None
    mesh, spec = sharding.mesh, sharding.spec
    if x.ndim != 3 or g.ndim != 3 or len(spec) > 2:
        return None
    batch_axes = active_axes("batch", mesh)
    per_device = math.prod(mesh.shape[a] for a in batch_axes)
    b, t, i = x.shape
    o = g.shape[-1]
    entries = [entry_axes(e) for e in tuple(spec) + (None,) * (2 - len(spec))]
    feature = []  # per accumulator dim (out, in): the non-batch axes it is split over
    for axes in entries:
        other = tuple(a for a in axes if a not in batch_axes)
        if other and len(other) != len(axes):
            return None  # one dimension split over batch and tensor axes together: XLA path
        feature.append(other)
    o_local = o // math.prod(mesh.shape[a] for a in feature[0])
    i_local = i // math.prod(mesh.shape[a] for a in feature[1])
    if b % per_device or not _pow2(b // per_device) or not _pow2(t) or t % config.block_t:
        return None  # Triton blocks are powers of two; other shapes take the XLA path
    if o_local % config.block_o or i_local % config.block_i:
        return None
    return mesh, spec_entry(batch_axes), spec_entry(feature[1]), spec_entry(feature[0]), P(*spec)


def applicable(x: jax.Array, g: jax.Array, sharding: NamedSharding | None) -> bool:
    """Whether `abs_grad_sum` may run the kernel for these operands (see the module doc)."""
    kind = mode()
    if kind == "off":
        return False
    if kind in ("on", "auto") and (jax.default_backend() != "gpu" or x.dtype not in (jnp.bfloat16, jnp.float16)):
        return False
    if kind == "auto" and (not isinstance(sharding, NamedSharding) or sharding.mesh.shape.get("tensor", 1) == 1):
        return False  # without tensor parallelism it costs memory (module doc): opt-in there
    if x.dtype != g.dtype:
        return False
    return _plan(x, g, sharding, _config_from_env()) is not None


def _kernel(g_ref, x_ref, o_ref, *, batch: int, seq: int, block_t: int):
    bo, bi = o_ref.shape

    def example(b, total):
        def tokens(s, tile):
            sl = pl.ds(pl.multiple_of(s * block_t, block_t), block_t)
            return tile + plgpu.dot(g_ref[b, sl, :], x_ref[b, sl, :], trans_a=True)

        tile = lax.fori_loop(0, seq // block_t, tokens, jnp.zeros((bo, bi), jnp.float32))
        return total + jnp.abs(tile)

    o_ref[...] = lax.fori_loop(0, batch, example, jnp.zeros((bo, bi), jnp.float32))


def local_abs_grad_sum(x: jax.Array, g: jax.Array, config: AbsKernelConfig | None = None,
                       interpret: bool = False) -> jax.Array:
    """sum_b |g[b]^T x[b]| as a float32 (out, in) array, on one device.

    x: (batch, seq, in), g: (batch, seq, out), same 16-bit dtype (float32 in interpret mode).
    """
    config = config or _config_from_env()
    b, t, i = x.shape
    o = g.shape[-1]
    bo, bi = config.block_o, config.block_i
    return pl.pallas_call(
        functools.partial(_kernel, batch=b, seq=t, block_t=config.block_t),
        grid=(o // bo, i // bi),
        in_specs=[
            pl.BlockSpec((b, t, bo), lambda m, n: (0, 0, m)),
            pl.BlockSpec((b, t, bi), lambda m, n: (0, 0, n)),
        ],
        out_specs=pl.BlockSpec((bo, bi), lambda m, n: (m, n)),
        out_shape=jax.ShapeDtypeStruct((o, i), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="harmjax_abs_grad_sum",
    )(g, x)


def abs_grad_sum(x: jax.Array, g: jax.Array, sharding: NamedSharding) -> jax.Array:
    """sum_b |g[b]^T x[b]| (float32, (out, in)) in `sharding`, the accumulator's; call only
    where `applicable` holds. On a mesh each device sums its own examples (with tensor
    parallelism, for its own block of the weight) and the partial sums are reduce-scattered
    (or all-reduced) over the batch axes."""
    config = _config_from_env()
    interpret = mode() == "interpret"
    mesh, batch, x_features, g_features, spec = _plan(x, g, sharding, config)
    batch_axes = active_axes("batch", mesh)
    if not batch_axes and x_features is None and g_features is None:
        return local_abs_grad_sum(x, g, config, interpret)

    def local(xl, gl):
        part = local_abs_grad_sum(xl, gl, config, interpret)
        done: set[str] = set()
        for dim, entry in enumerate(spec):
            axes = tuple(a for a in entry_axes(entry) if a in batch_axes)
            if axes:
                part = lax.psum_scatter(part, axes if len(axes) > 1 else axes[0], scatter_dimension=dim, tiled=True)
                done.update(axes)
        rest = tuple(a for a in batch_axes if a not in done)
        return lax.psum(part, rest) if rest else part

    return jax.shard_map(
        local, mesh=mesh, in_specs=(P(batch, None, x_features), P(batch, None, g_features)),
        out_specs=spec, check_vma=False,
    )(x, g)
