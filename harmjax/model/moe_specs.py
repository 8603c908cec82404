"""Names, shapes and logical axes of mixture-of-experts blocks, in the checkpoint's own layout.

Separate from `harmjax.model.moe` (the compute) so `param_specs` can describe MoE parameters
without importing the decoder's layers. Layouts (`ModelConfig.moe_layout`):
  mixtral: `block_sparse_moe.gate.weight` and `block_sparse_moe.experts.{e}.w1/w3/w2.weight`;
  qwen:    `mlp.gate.weight` and `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`;
  fused:   gpt-oss' `mlp.router.weight/bias` and 3-D `mlp.experts.gate_up_proj` (E, hidden,
    2*inter), `gate_up_proj_bias`, `down_proj` (E, inter, hidden), `down_proj_bias`.
"""

from __future__ import annotations

import re

from harmjax.config import ModelConfig

# Per-expert module names of (gate, up, down) in each per-expert layout.
PARTS = {"mixtral": ("w1", "w3", "w2"), "qwen": ("gate_proj", "up_proj", "down_proj")}

# A per-expert weight's HF name: (experts module, expert index, matrix kind).
_EXPERT_LEAF_RE = re.compile(r"^(model\.layers\.\d+\.(?:mlp|block_sparse_moe)\.experts)\.(\d+)\.(\w+)\.weight$")
_EXPERT_PARTS = frozenset(p for parts in PARTS.values() for p in parts)


def ffn_key(config: ModelConfig) -> str:
    """The block's feed-forward module name: Mixtral files call it `block_sparse_moe`."""
    return "block_sparse_moe" if config.moe_layout == "mixtral" else "mlp"


def router_key(config: ModelConfig) -> str:
    """The router's module name inside the MoE block."""
    return "router" if config.moe_layout == "fused" else "gate"


def block_specs(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """(shape, logical axes) of a MoE block's parameters, keyed by name relative to the layer."""
    c = config
    e, d, m = c.num_experts, c.hidden_size, c.moe_intermediate_size
    pre = ffn_key(c)
    r = f"{pre}.{router_key(c)}"
    specs = {f"{r}.weight": ((e, d), (None, "embed"))}
    if c.moe_layout == "fused":
        specs[f"{r}.bias"] = ((e,), (None,))
        x = f"{pre}.experts"
        specs[f"{x}.gate_up_proj"] = ((e, d, 2 * m), ("expert", "embed", "mlp"))
        specs[f"{x}.gate_up_proj_bias"] = ((e, 2 * m), ("expert", "mlp"))
        specs[f"{x}.down_proj"] = ((e, m, d), ("expert", "mlp", "embed"))
        specs[f"{x}.down_proj_bias"] = ((e, d), ("expert", "norm"))
        return specs
    gate, up, down = PARTS[c.moe_layout]
    for i in range(e):
        x = f"{pre}.experts.{i}"
        specs[f"{x}.{gate}.weight"] = ((m, d), ("mlp", "embed"))
        specs[f"{x}.{up}.weight"] = ((m, d), ("mlp", "embed"))
        specs[f"{x}.{down}.weight"] = ((d, m), ("embed", "mlp"))
    return specs


def matrix_names(config: ModelConfig) -> tuple[str, ...]:
    """Relative names of a MoE block's scorable matrices: the router and every expert matrix
    (biases are not linear weights and are not scored by default)."""
    return tuple(n for n, (shape, _) in block_specs(config).items() if len(shape) >= 2 and not n.endswith("bias"))


def expert_leaf(name: str) -> tuple[str, int] | None:
    """(group key, expert index) of a per-expert weight of the Mixtral or Qwen3-MoE layout, None
    for any other name (dense weights, routers, gpt-oss' fused tensors).

    The key names the (layer, matrix kind) the leaf shares with the layer's other experts, with
    `*` for the expert: `model.layers.3.mlp.experts.5.gate_proj.weight` ->
    (`model.layers.3.mlp.experts.*.gate_proj.weight`, 5). Those leaves together are what a
    fused checkpoint stores as one (E, ., .) tensor."""
    match = _EXPERT_LEAF_RE.match(name)
    if match is None or match.group(3) not in _EXPERT_PARTS:
        return None
    return f"{match.group(1)}.*.{match.group(3)}.weight", int(match.group(2))
