"""Device meshes and shardings derived from logical axis names.

A mesh has three named axes: `data` (batch), `fsdp` (batch and parameters: each weight is
split over it and gathered per layer) and `tensor` (heads / MLP width / vocabulary). Each
parameter's logical axes (from `param_specs`) map to mesh axes through `LOGICAL_RULES`; a
dimension that does not divide the mesh axis is replicated rather than failing, so the same
code runs on 1 CPU, 8 fake CPU devices, one GPU or a pod.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from harmjax.config import ModelConfig
from harmjax.model.param_specs import param_specs
from harmjax.tree import unflatten

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it is split over (in order of preference).
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    # gpt-oss' fused expert tensors: FSDP over experts (the expert dimension takes `fsdp`
    # before `embed` can; an expert count that does not divide it is replicated).
    "expert": ("fsdp",),
    "norm": (),
    "seq": (),
}


HOST = 0  # MeshConfig(tensor=HOST): tensor parallelism over each host's devices


def host_tensor_size(config: ModelConfig | None = None, local_devices: int | None = None) -> int:
    """The tensor-parallel size for `MeshConfig(tensor=HOST)`: the largest divisor of the
    devices per process (`local_devices`, default `jax.local_device_count()`) that divides the
    model's query heads, KV heads and MLP width, so no projection is left replicated (without
    a `config`, all local devices)."""
    local = jax.local_device_count() if local_devices is None else local_devices
    for size in range(local, 0, -1):
        if local % size:
            continue
        if config is None or all(
            n % size == 0 for n in (config.num_heads, config.num_kv_heads, config.intermediate_size)
        ):
            return size
    return 1


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; exactly one may be -1, meaning "all remaining devices".

    `tensor=HOST` (0) splits heads and MLP width over the devices of one host (as many as the
    model divides, `host_tensor_size`) and leaves the other axes to span hosts: tensor
    parallelism where the interconnect is fastest, FSDP or data parallelism across hosts.
    On 2 x H200 it made Qwen2.5-14B/32B harm scans 1.1-1.2x faster than FSDP 2 and retain scans
    1.4x (docs/measurements.md "Scans at 14B and 32B"). `harmjax.load` resolves it against the model's
    config.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def resolve(self, config: ModelConfig | None = None, local_devices: int | None = None) -> "MeshConfig":
        """This config with `tensor=HOST` replaced by `host_tensor_size(config, local_devices)`."""
        if self.tensor != HOST:
            return self
        return dataclasses.replace(self, tensor=host_tensor_size(config, local_devices))

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """Resolves -1 (and `tensor=HOST`, against all local devices) against `num_devices`
        and checks the product."""
        sizes = [self.data, self.fsdp, self.resolve().tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"At most one mesh axis may be -1, got {self}.")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices do not divide into mesh {self}.")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"Mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                f"but {num_devices} are in use."
            )
        return tuple(sizes)


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None,
              model_config: ModelConfig | None = None) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh over `devices` (default: all devices); `model_config`
    sizes `tensor=HOST` to what the model divides.

    Axis types are Auto: shardings are given on jit inputs/outputs and XLA's partitioner
    propagates them through the model, which keeps the model code free of sharding
    annotations (jax.make_mesh now defaults to Explicit, which would require them).
    With `tensor=HOST`, if the topology-aware order would put one tensor group on several
    hosts, devices are laid out by process instead (`tensor` innermost), so it never does.
    """
    config = config or MeshConfig()
    per_host = config.tensor == HOST
    devices = list(devices if devices is not None else jax.devices())
    # HOST counts this process's devices among those given (a subset mesh stays within it).
    config = config.resolve(model_config, sum(d.process_index == jax.process_index() for d in devices) or None)
    shape = config.shape(len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):
        mesh = jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    else:
        mesh = Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)
    if per_host and not tensor_groups_within_hosts(mesh):
        ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
        mesh = Mesh(np.asarray(ordered).reshape(shape), MESH_AXES, axis_types=axis_types)
    return mesh


def tensor_groups_within_hosts(mesh: Mesh) -> bool:
    """Whether every group of devices along `tensor` belongs to one process."""
    groups = np.asarray(mesh.devices).reshape(-1, mesh.shape["tensor"])
    return all(len({d.process_index for d in group}) == 1 for group in groups)


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: dict[str, tuple[str, ...]] | None = None
) -> P:
    """PartitionSpec for an array with logical `axes`; indivisible dimensions are replicated."""
    rules = LOGICAL_RULES if rules is None else rules
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(axes, shape):
        mesh_axes = tuple(
            a for a in (rules.get(name, ()) if name else ()) if a not in used and mesh.shape[a] > 1
        )
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if mesh_axes and dim % size:
            logging.log_first_n(
                logging.WARNING,
                "Dimension %d (%s) does not divide mesh axes %s of size %d; replicating it.",
                10, dim, name, mesh_axes, size,
            )
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(spec_entry(mesh_axes))
    return P(*spec)


def param_shardings(config: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """NamedSharding for every parameter, as a pytree with the params' structure."""
    flat = {
        name: NamedSharding(mesh, logical_to_spec(spec.axes, spec.shape, mesh))
        for name, spec in param_specs(config).items()
    }
    return unflatten(flat)


def active_axes(logical: str, mesh) -> tuple[str, ...]:
    """The mesh axes of extent > 1 that a logical axis maps to (a Mesh or AbstractMesh)."""
    return tuple(a for a in LOGICAL_RULES[logical] if mesh.shape[a] > 1)


def spec_entry(mesh_axes: tuple[str, ...]):
    """One PartitionSpec entry for a dimension split over `mesh_axes`: None, a name, or a tuple."""
    return None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes


def entry_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (the inverse of `spec_entry`)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a (batch, ...) array: batch split over data and fsdp."""
    return NamedSharding(mesh, P(spec_entry(active_axes("batch", mesh)), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    """Batch sizes must be multiples of this (the data x fsdp extent)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def round_batch(batch_size: int, mesh: Mesh) -> int:
    """`batch_size` (at least 1) rounded up to a multiple of `batch_divisor(mesh)`."""
    divisor = batch_divisor(mesh)
    return -(-max(1, batch_size) // divisor) * divisor


@functools.lru_cache(maxsize=256)
def _zeros_maker(shape: tuple[int, ...], dtype, sharding):
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)


def sharded_zeros(shape: Sequence[int], dtype, sharding) -> jax.Array:
    """Zeros created directly in `sharding` (never whole on one device). One compiled maker per
    (shape, dtype, sharding): an 8B model's 224 accumulators share a handful, where a fresh
    jit per leaf cost ~12 s of compiling on every scan."""
    return _zeros_maker(tuple(shape), jnp.dtype(dtype), sharding)()


def devices_have_room(mesh: Mesh, per_device_bytes: float, margin: float = 1.5) -> bool:
    """Whether every device of `mesh` reports free memory of at least `margin` x
    `per_device_bytes` (False on backends without memory statistics, like the CPU): the test
    for making an optional derived copy of the weights (fused projections, stacked experts)."""
    for device in mesh.devices.flat:
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats or stats["bytes_limit"] - stats.get("bytes_in_use", 0) < margin * per_device_bytes:
            return False
    return True
