"""Every parameter of a decoder described once: HF name, shape and logical axes.

The params pytree is a nested dict whose path, joined with ".", is the Hugging Face tensor
name, and whose leaves keep HF's orientation (Linear weights are (out_features,
in_features)). Conversion, sharding, validation of checkpoints and of masks all derive from
`param_specs`, so they cannot disagree about what a model contains.

Logical axis names (mapped to mesh axes in `harmjax.sharding`):
  vocab, embed, q_heads (num_heads*head_dim), kv_heads (num_kv_heads*head_dim), mlp, norm.
"""

from __future__ import annotations

import dataclasses
import math

from harmjax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape and logical axes of one parameter."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]


def linear_names(config: ModelConfig) -> tuple[str, ...]:
    """Relative names of the linear projections in every decoder block: the seven of Llama,
    or the checkpoint's own four where it fuses q/k/v and gate/up (Phi-3)."""
    if config.fused_linears:
        return ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    return (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )


def layer_param_specs(config: ModelConfig) -> dict[str, ParamSpec]:
    """Specs of one decoder block, keyed by name relative to `model.layers.{i}`."""
    c = config
    d, q, kv, m = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    if c.fused_linears:
        return _fused_layer_specs(c) | _norm_specs(c)
    specs = {
        "self_attn.q_proj.weight": ParamSpec((q, d), ("q_heads", "embed")),
        "self_attn.k_proj.weight": ParamSpec((kv, d), ("kv_heads", "embed")),
        "self_attn.v_proj.weight": ParamSpec((kv, d), ("kv_heads", "embed")),
        "self_attn.o_proj.weight": ParamSpec((d, q), ("embed", "q_heads")),
        "mlp.gate_proj.weight": ParamSpec((m, d), ("mlp", "embed")),
        "mlp.up_proj.weight": ParamSpec((m, d), ("mlp", "embed")),
        "mlp.down_proj.weight": ParamSpec((d, m), ("embed", "mlp")),
    }
    if c.qkv_bias:
        specs["self_attn.q_proj.bias"] = ParamSpec((q,), ("q_heads",))
        specs["self_attn.k_proj.bias"] = ParamSpec((kv,), ("kv_heads",))
        specs["self_attn.v_proj.bias"] = ParamSpec((kv,), ("kv_heads",))
    if c.o_bias:
        specs["self_attn.o_proj.bias"] = ParamSpec((d,), ("norm",))
    if c.mlp_bias:
        specs["mlp.gate_proj.bias"] = ParamSpec((m,), ("mlp",))
        specs["mlp.up_proj.bias"] = ParamSpec((m,), ("mlp",))
        specs["mlp.down_proj.bias"] = ParamSpec((d,), ("norm",))
    if c.qk_norm == "head":
        specs["self_attn.q_norm.weight"] = ParamSpec((c.head_dim,), ("norm",))
        specs["self_attn.k_norm.weight"] = ParamSpec((c.head_dim,), ("norm",))
    elif c.qk_norm == "full":
        specs["self_attn.q_norm.weight"] = ParamSpec((q,), ("norm",))
        specs["self_attn.k_norm.weight"] = ParamSpec((kv,), ("norm",))
    return specs | _norm_specs(c)


def _fused_layer_specs(c: ModelConfig) -> dict[str, ParamSpec]:
    """Phi-3's fused projections, in its checkpoint's order and shapes. The fused output
    dimension shards like its first part (q heads, MLP width): with tensor parallelism GSPMD
    then regathers the q/k/v and gate/up splits, correct but with extra communication."""
    d, q, kv, m = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    return {
        "self_attn.qkv_proj.weight": ParamSpec((q + 2 * kv, d), ("q_heads", "embed")),
        "self_attn.o_proj.weight": ParamSpec((d, q), ("embed", "q_heads")),
        "mlp.gate_up_proj.weight": ParamSpec((2 * m, d), ("mlp", "embed")),
        "mlp.down_proj.weight": ParamSpec((d, m), ("embed", "mlp")),
    }


def _norm_specs(c: ModelConfig) -> dict[str, ParamSpec]:
    """The block's RMSNorm weights in the family's norm placement."""
    d = c.hidden_size
    specs = {}
    norm = ParamSpec((d,), ("norm",))
    if c.norm_style == "pre":
        specs["input_layernorm.weight"] = norm
        specs["post_attention_layernorm.weight"] = norm
    elif c.norm_style == "post":
        specs["post_attention_layernorm.weight"] = norm
        specs["post_feedforward_layernorm.weight"] = norm
    elif c.norm_style == "sandwich":
        specs["input_layernorm.weight"] = norm
        specs["post_attention_layernorm.weight"] = norm
        specs["pre_feedforward_layernorm.weight"] = norm
        specs["post_feedforward_layernorm.weight"] = norm
    else:
        raise ValueError(f"Unknown norm_style {c.norm_style!r}.")
    return specs


def param_specs(config: ModelConfig) -> dict[str, ParamSpec]:
    """Specs of every parameter, keyed by full HF name, in HF's order."""
    c = config
    specs = {"model.embed_tokens.weight": ParamSpec((c.vocab_size, c.hidden_size), ("vocab", "embed"))}
    layer = layer_param_specs(c)
    for i in range(c.num_layers):
        for name, spec in layer.items():
            specs[f"model.layers.{i}.{name}"] = spec
    specs["model.norm.weight"] = ParamSpec((c.hidden_size,), ("norm",))
    if not c.tie_word_embeddings:
        specs["lm_head.weight"] = ParamSpec((c.vocab_size, c.hidden_size), ("vocab", "embed"))
    return specs


def num_params(config: ModelConfig) -> int:
    """Total parameter count of a model of `config` (tied embeddings counted once)."""
    return sum(math.prod(spec.shape) for spec in param_specs(config).values())
