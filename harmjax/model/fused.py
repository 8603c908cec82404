"""Fused projections for inference: q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`.

Why: a decode step is a long chain of small kernels, each with a fixed launch and ramp cost;
at batch 64 the k/v projections of an 8B model (1024 outputs) also fill only a few thread
blocks. Concatenating the weights that read the same input makes one larger matmul in place
of three (attention) and two (MLP). The params pytree itself keeps HF names; this builds a
derived tree for generation only, once per `generate` call. It costs the concatenated
weights' bytes of extra device memory (about 57% of an 8B model's), so `auto` fuses only
when the device reports that much free memory with room to spare.

Fusion needs plain arrays of one dtype, and a mesh without tensor parallelism: the fused
output dimension would otherwise need its own shard layout so that q, k and v stay whole on
each device.

Phi-3's checkpoints are fused already (`ModelConfig.fused_linears`): their params tree has
`qkv_proj` and `gate_up_proj` as its own leaves, `is_fused` is true for it, nothing is
fused again, and its shardings are the params' own.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from harmjax.config import ModelConfig
from harmjax.model import moe_stack
from harmjax.sharding import devices_have_room, param_shardings

# (block, fused name, parts in output order)
GROUPS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")), ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


def is_fused(params: dict) -> bool:
    """Whether `params` already has fused q/k/v: a tree from `fuse_projections`, or a
    checkpoint stored fused (Phi-3)."""
    return "qkv_proj" in params["model"]["layers"]["0"]["self_attn"]


def bias_flags(params: dict) -> tuple[bool, bool]:
    """(qkv_proj has a bias, gate_up_proj has a bias) of a fused tree: with the config, what
    fixes its structure and shardings."""
    block = params["model"]["layers"]["0"]
    return "bias" in block["self_attn"]["qkv_proj"], "bias" in block["mlp"]["gate_up_proj"]


def fusible(params: dict, config: ModelConfig, mesh: Mesh) -> bool:
    """Whether every layer's parts are plain arrays of one dtype on a mesh without tensor
    parallelism (see the module docstring). False for an already fused tree."""
    if mesh.shape.get("tensor", 1) != 1 or is_fused(params) or config.num_experts:
        return False  # MoE blocks have no gate/up pair to fuse (harmjax.model.moe stacks experts)
    for layer in params["model"]["layers"].values():
        for block, _, parts in GROUPS:
            leaves = [layer[block][name][key] for name in parts for key in layer[block][name]]
            if not all(isinstance(x, jax.Array) for x in leaves) or len({x.dtype for x in leaves}) != 1:
                return False
    return True


def extra_bytes(params: dict) -> int:
    """Device bytes the fused copies take (the unfused weights stay with the caller)."""
    total = 0
    for layer in params["model"]["layers"].values():
        for block, _, parts in GROUPS:
            total += sum(x.nbytes for name in parts for x in layer[block][name].values())
    return total


def fused_shardings(config: ModelConfig, mesh: Mesh, has_bias: tuple[bool, bool]) -> dict[str, Any]:
    """NamedShardings of the fused tree: each fused weight takes its first part's sharding
    (the output dimension is unsharded when tensor parallelism is off). `has_bias` as
    `bias_flags` returns it."""
    tree = param_shardings(config, mesh)
    if config.fused_linears:  # the checkpoint's own fused layout (Phi-3)
        return tree
    for layer in tree["model"]["layers"].values():
        for (block, fused, parts), bias in zip(GROUPS, has_bias):
            first = layer[block][parts[0]]
            layer[block][fused] = {k: first[k] for k in first if k == "weight" or bias}
            for name in parts:
                del layer[block][name]
    return tree


def fuse_projections(params: dict, config: ModelConfig, mesh: Mesh) -> dict:
    """The params tree with q/k/v and gate/up concatenated along their output dimension
    (`qkv_proj`, `gate_up_proj`; biases too), sharded like the params. The input tree is
    not modified; unfused leaves are shared, not copied. An already fused tree (Phi-3's
    own layout included) is returned as it is."""
    if is_fused(params):
        return params
    first = params["model"]["layers"]["0"]
    has_bias = tuple("bias" in first[block][parts[0]] for block, _, parts in GROUPS)
    layers = _jit_fuse(config, mesh, has_bias)(params["model"]["layers"])
    return {**params, "model": {**params["model"], "layers": layers}}


@functools.lru_cache(maxsize=16)
def _jit_fuse(config: ModelConfig, mesh: Mesh, has_bias: tuple[bool, bool]):
    """The jitted concatenation, compiled once per model shape and mesh."""

    def fuse(layers):
        out = {}
        for key, layer in layers.items():
            layer = {block: dict(sub) for block, sub in layer.items()}
            for (block, fused, parts), bias in zip(GROUPS, has_bias):
                sub = layer[block]
                entry = {"weight": jnp.concatenate([sub[n]["weight"] for n in parts], axis=0)}
                if bias:
                    entry["bias"] = jnp.concatenate([sub[n]["bias"] for n in parts], axis=0)
                for n in parts:
                    del sub[n]
                sub[fused] = entry
            out[key] = layer
        return out

    return jax.jit(fuse, out_shardings=fused_shardings(config, mesh, has_bias)["model"]["layers"])


def should_fuse(params: dict, config: ModelConfig, mesh: Mesh, setting: bool | str) -> bool:
    """Resolves the `fuse_projections` setting: True/False as given (True still needs
    `fusible`), "auto" when fusible and every device reports free memory of at least 1.5x
    its share of the fused copies (backends without memory statistics, like the CPU, stay
    unfused)."""
    if setting is False or not fusible(params, config, mesh):
        return False
    if setting is True:
        return True
    if setting != "auto":
        raise ValueError(f"fuse_projections must be True, False or 'auto', got {setting!r}.")
    return devices_have_room(mesh, extra_bytes(params) / mesh.devices.size)


def fuse_if_worthwhile(params: dict, config: ModelConfig, mesh: Mesh, setting: bool | str = "auto") -> dict:
    """`fuse_projections(params)` when `should_fuse` allows it under `setting`, else `params`
    unchanged (an already fused tree included). Callers that generate in several calls fuse
    once with this and pass the result as `params`. For MoE models the generation tree is
    the per-expert matrices stacked instead (`harmjax.model.moe_stack`), under the same setting."""
    if config.num_experts:
        return moe_stack.stack_if_worthwhile(params, config, mesh, setting)
    return fuse_projections(params, config, mesh) if should_fuse(params, config, mesh, setting) else params


__all__ = [
    "GROUPS",
    "bias_flags",
    "extra_bytes",
    "fuse_if_worthwhile",
    "fusible",
    "fuse_projections",
    "fused_shardings",
    "is_fused",
    "should_fuse",
]
