"""Stacked expert weights for generation: the derived inference tree of per-expert MoE files.

Mixtral and Qwen3-MoE checkpoints hold one (out, in) matrix per expert. The MoE block needs
them as (experts, in, out) arrays; stacking inside the decode program would copy every
expert's bytes at every step (E times the active experts' bytes a gather path reads). So
generation stacks them once per call into a derived tree (`moe.stack_experts`' layout:
`experts.stacked.{gate, up, down}`), the way `harmjax.model.fused` derives fused q/k/v for
dense models; the params tree itself keeps the file's names. The stacked arrays get their
own shardings from logical axes (`expert` first, as gpt-oss' fused 3-D tensors shard), so the
jitted sampler programs take them without resharding.

The copy costs the experts' bytes of extra device memory (most of an MoE model's), so under
"auto" it is made only when every device reports that much free memory with room to spare;
otherwise (and on backends without memory statistics) the tree stays per-expert and the
block stacks inside the program, as before.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding

from harmjax.config import ModelConfig
from harmjax.model import moe
from harmjax.model.moe_specs import PARTS, ffn_key
from harmjax.sharding import devices_have_room, logical_to_spec, param_shardings

# (stacked name, logical axes of the (E, in, out) array)
_STACKED_AXES = {"gate": ("expert", "embed", "mlp"), "up": ("expert", "embed", "mlp"), "down": ("expert", "mlp", "embed")}


def _moe_layers(tree: dict, config: ModelConfig):
    """(layer key, MoE block) of every layer whose feed-forward has per-expert leaves or a
    stacked copy (dense `mlp_only_layers` are skipped)."""
    key = ffn_key(config)
    for i, layer in tree["model"]["layers"].items():
        block = layer.get(key)
        if block is not None and "experts" in block:
            yield i, block


def is_stacked(params: dict, config: ModelConfig) -> bool:
    """Whether `params` is a tree from `stack_for_generation` (its experts are stacked)."""
    return any("stacked" in block["experts"] for _, block in _moe_layers(params, config))


def stackable(params: dict, config: ModelConfig) -> bool:
    """Whether `params` has per-expert leaves (Mixtral, Qwen3-MoE), not yet stacked, that are
    plain arrays of one dtype (what the jitted stacking takes)."""
    if config.moe_layout not in PARTS or is_stacked(params, config):
        return False
    leaves = [x for _, block in _moe_layers(params, config) for x in jax.tree.leaves(block["experts"])]
    return bool(leaves) and all(isinstance(x, jax.Array) for x in leaves) and len({x.dtype for x in leaves}) == 1


def extra_bytes(params: dict, config: ModelConfig) -> int:
    """Device bytes the stacked copies take (the per-expert leaves stay with the caller)."""
    return sum(x.nbytes for _, block in _moe_layers(params, config) for x in jax.tree.leaves(block["experts"]))


def stacked_shardings(config: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """NamedShardings of a stacked tree: the params' own, with each MoE layer's per-expert
    dict replaced by its stacked (E, in, out) arrays' shardings from logical axes."""
    tree = param_shardings(config, mesh)
    d, m, e = config.hidden_size, config.moe_intermediate_size, config.num_experts
    shapes = {"gate": (e, d, m), "up": (e, d, m), "down": (e, m, d)}
    stacked = {name: NamedSharding(mesh, logical_to_spec(axes, shapes[name], mesh))
               for name, axes in _STACKED_AXES.items()}
    for _, block in _moe_layers(tree, config):
        block["experts"] = {"stacked": dict(stacked)}
    return tree


def stack_for_generation(params: dict, config: ModelConfig, mesh: Mesh) -> dict:
    """`moe.stack_experts(params)` made once on device, each stacked array in its own sharding
    (`stacked_shardings`). The input tree is not modified; other leaves are shared, not
    copied. A tree without per-expert leaves (or already stacked) comes back as it is."""
    if config.moe_layout not in PARTS or is_stacked(params, config):
        return params
    layers = _jit_stack(config, mesh)(params["model"]["layers"])
    return {**params, "model": {**params["model"], "layers": layers}}


@functools.lru_cache(maxsize=16)
def _jit_stack(config: ModelConfig, mesh: Mesh):
    """The jitted stacking, compiled once per model shape and mesh."""

    def stack(layers):
        return moe.stack_experts({"model": {"layers": layers}}, config)["model"]["layers"]

    return jax.jit(stack, out_shardings=stacked_shardings(config, mesh)["model"]["layers"])


def should_stack(params: dict, config: ModelConfig, mesh: Mesh, setting: bool | str) -> bool:
    """Resolves the generation-tree setting (`fuse_projections` of `generate_ids`): True/False
    as given (True still needs `stackable`), "auto" when stackable and every device reports
    free memory of at least 1.5x its share of the stacked copies."""
    if setting is False or not stackable(params, config):
        return False
    if setting is True:
        return True
    if setting != "auto":
        raise ValueError(f"fuse_projections must be True, False or 'auto', got {setting!r}.")
    return devices_have_room(mesh, extra_bytes(params, config) / mesh.devices.size)


def stack_if_worthwhile(params: dict, config: ModelConfig, mesh: Mesh, setting: bool | str = "auto") -> dict:
    """`stack_for_generation(params)` when `should_stack` allows it under `setting`, else
    `params` unchanged."""
    return stack_for_generation(params, config, mesh) if should_stack(params, config, mesh, setting) else params


__all__ = [
    "extra_bytes",
    "is_stacked",
    "should_stack",
    "stack_for_generation",
    "stack_if_worthwhile",
    "stackable",
    "stacked_shardings",
]
