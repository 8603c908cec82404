"""The decoder's configuration: one frozen dataclass with family flags.

`ModelConfig` is hashable, so it can be a static argument of `jax.jit`. It is built from a
Hugging Face config by `ModelConfig.from_hf`, which goes through transformers' own config
classes so that every on-disk format (old `rope_scaling` + `rope_theta`, new
`rope_parameters`, per-layer-type RoPE, legacy Gemma activations) is normalised exactly as
transformers normalises it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from harmjax.errors import UnsupportedArchitectureError

# model_type -> the family flags that differ from Llama. Everything the decoder does
# differently per family is one of these flags; there is no per-family code path.
_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": "head"},
    "gemma": {"norm_offset": 1.0, "norm_scale_in_fp32": True, "embed_scale": True},
    "gemma2": {
        "norm_offset": 1.0,
        "norm_scale_in_fp32": True,
        "embed_scale": True,
        "norm_style": "sandwich",
    },
    "olmo2": {"qk_norm": "full", "norm_style": "post", "norm_scale_in_fp32": True},
    "olmo3": {"qk_norm": "full", "norm_style": "post", "norm_scale_in_fp32": True},
    "gemma3_text": {
        "norm_offset": 1.0,
        "norm_scale_in_fp32": True,
        "embed_scale": True,
        "norm_style": "sandwich",
        "qk_norm": "head",
    },
    "smollm3": {},  # nope_layers from the checkpoint's no_rope_layers
    "phi3": {"fused_linears": True},
    # Mixture-of-experts families: their MoE flags come from `_moe_flags`.
    "mixtral": {"moe_layout": "mixtral"},
    "qwen3_moe": {"qk_norm": "head", "moe_layout": "qwen"},
    "gpt_oss": {"moe_layout": "fused", "attn_sinks": True},
}

# Families whose attention logit scale is query_pre_attn_scalar**-0.5, with optional soft-caps.
_QUERY_PRE_ATTN_SCALAR = ("gemma2", "gemma3_text")
# Families that apply `sliding_window` to every layer when it is set (no layer_types).
_WINDOW_ON_EVERY_LAYER = ("mistral", "mixtral", "phi3")

SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)

_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}

_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters for one attention type (HF `rope_parameters`)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    partial_rotary_factor: float = 1.0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    @classmethod
    def from_hf(cls, params: dict[str, Any], model_type: str) -> "RopeConfig":
        """Builds from one standardised HF `rope_parameters` dict."""
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in _ROPE_TYPES:
            raise UnsupportedArchitectureError(
                f"RoPE type {rope_type!r} of this {model_type} checkpoint is not supported; "
                f"supported: {list(_ROPE_TYPES)}."
            )
        def opt_float(key):
            return None if params.get(key) is None else float(params[key])

        original = params.get("original_max_position_embeddings")
        return cls(
            theta=float(params.get("rope_theta", 10000.0)),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0) or 1.0),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=None if original is None else int(original),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            attention_factor=opt_float("attention_factor"),
            mscale=opt_float("mscale"),
            mscale_all_dim=opt_float("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
            partial_rotary_factor=float(params.get("partial_rotary_factor") or 1.0),
            short_factor=tuple(float(x) for x in params.get("short_factor") or ()),
            long_factor=tuple(float(x) for x in params.get("long_factor") or ()),
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and family flags of a decoder-only transformer.

    Attributes beyond the usual sizes:
      layer_types: per layer, "full" or "sliding" attention.
      qkv_bias / o_bias / mlp_bias: which linear projections carry a bias.
      qk_norm: "none", "head" (RMSNorm over head_dim, Qwen3) or "full" (over all heads, OLMo-2/3).
      norm_style: "pre" (Llama), "post" (OLMo-2: norm after attention/MLP, before the
        residual add) or "sandwich" (Gemma-2: both).
      norm_offset: 1.0 where the RMSNorm scale is stored as `weight` and applied as `1 + weight`.
      norm_scale_in_fp32: multiply by the norm weight before casting back to the activation
        dtype (Gemma, OLMo) rather than after (Llama).
      embed_scale: multiply embeddings by sqrt(hidden_size) (Gemma).
      attn_scale: the query scaling (head_dim**-0.5, or query_pre_attn_scalar**-0.5 in Gemma-2).
      rope / rope_local: RoPE for full and for sliding-window layers.
      nope_layers: indices of layers that apply no RoPE at all (SmolLM3's NoPE layers).
      fused_linears: the checkpoint stores q/k/v as one `self_attn.qkv_proj` and gate/up as
        one `mlp.gate_up_proj` (Phi-3/Phi-4); those fused tensors are the params' leaves.
      moe_layout: "" (dense), "mixtral" (per-expert w1/w3/w2 under block_sparse_moe), "qwen"
        (per-expert gate/up/down_proj under mlp) or "fused" (gpt-oss 3-D expert tensors).
      num_experts / num_experts_per_tok / moe_intermediate_size: experts, top-k, expert width.
      moe_layers: per layer, whether its feed-forward is the MoE block (Qwen3-MoE's
        mlp_only_layers and decoder_sparse_step make some dense).
      router: "softmax_topk" (softmax, then top-k; renormalised when norm_topk_prob) or
        "topk_softmax" (top-k logits, then softmax over them: gpt-oss).
      swiglu_limit / swiglu_alpha: gpt-oss's clamped SwiGLU; attn_sinks: per-head sink logits.
      moe_impl: "auto", "ragged", "gather" or "dense" (see harmjax.model.moe).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    rope_local: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str = "none"
    norm_style: str = "pre"
    norm_offset: float = 0.0
    norm_scale_in_fp32: bool = False
    embed_scale: bool = False
    activation: str = "silu"
    tie_word_embeddings: bool = False
    attn_scale: float = 0.0
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    nope_layers: tuple[int, ...] = ()
    fused_linears: bool = False
    # Mixture of experts (harmjax.model.moe); num_experts=0 is a dense model.
    moe_layout: str = ""
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_layers: tuple[bool, ...] = ()
    router: str = "softmax_topk"
    norm_topk_prob: bool = True
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    attn_sinks: bool = False
    moe_impl: str = "auto"

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
        if self.num_experts and not self.moe_layers:
            object.__setattr__(self, "moe_layers", (True,) * self.num_layers)
        if not self.attn_scale:
            object.__setattr__(self, "attn_scale", self.head_dim**-0.5)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers."
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}."
            )

    @property
    def family(self) -> str:
        """The model family, which is HF's `model_type`."""
        return self.model_type

    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModelConfig":
        """Builds from a transformers `PretrainedConfig` (or a config.json dict)."""
        if isinstance(hf_config, dict):
            hf_config = hf_config_from_dict(hf_config)
        elif getattr(hf_config, "model_type", None) in MULTIMODAL_TEXT_TOWERS:
            hf_config = hf_config.text_config
        model_type = hf_config.model_type
        check_supported(model_type, getattr(hf_config, "architectures", None))
        check_quantization(getattr(hf_config, "quantization_config", None), model_type)
        flags = dict(_FAMILIES[model_type])
        c = hf_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        num_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads

        act_name = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", "silu")
        if act_name not in _ACTIVATIONS:
            raise UnsupportedArchitectureError(
                f"Activation {act_name!r} is not supported; supported: {sorted(_ACTIVATIONS)}."
            )

        layer_types = _layer_types(c, model_type)
        rope, rope_local = _rope_configs(c, model_type)
        attention_bias = bool(getattr(c, "attention_bias", False))
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias, o_bias = attention_bias, attention_bias
        flags.update(qkv_bias=qkv_bias, o_bias=o_bias)
        if getattr(c, "use_bidirectional_attention", False):
            raise UnsupportedArchitectureError(
                f"use_bidirectional_attention=True ({model_type}) is not supported; harmjax "
                "decodes causal language models."
            )
        if model_type == "smollm3":  # HF's no_rope_layers holds 1 where a layer uses RoPE.
            flags["nope_layers"] = tuple(i for i, use in enumerate(c.no_rope_layers) if not use)
        flags.update(_moe_flags(c, model_type))
        if model_type in _QUERY_PRE_ATTN_SCALAR:
            flags["attn_scale"] = float(c.query_pre_attn_scalar) ** -0.5
            flags["attn_logit_softcap"] = getattr(c, "attn_logit_softcapping", None)
            flags["final_logit_softcap"] = getattr(c, "final_logit_softcapping", None)
        return cls(
            model_type=model_type,
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=num_kv,
            head_dim=head_dim,
            rms_norm_eps=float(c.rms_norm_eps),
            rope=rope,
            rope_local=rope_local,
            max_position_embeddings=int(getattr(c, "max_position_embeddings", 4096)),
            layer_types=layer_types,
            sliding_window=getattr(c, "sliding_window", None) if "sliding" in layer_types else None,
            mlp_bias=bool(getattr(c, "mlp_bias", False)),
            activation=_ACTIVATIONS[act_name],
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            **flags,
        )


def check_supported(model_type: str | None, architectures: list[str] | None = None) -> None:
    """Raises UnsupportedArchitectureError unless `model_type` is a supported family."""
    if model_type not in _FAMILIES:
        arch = f" (architectures {architectures})" if architectures else ""
        raise UnsupportedArchitectureError(
            f"Architecture model_type={model_type!r}{arch} is not supported by harmjax. "
            f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    if architectures and not any(a.endswith("ForCausalLM") for a in architectures):
        raise UnsupportedArchitectureError(
            f"Architectures {architectures} has no *ForCausalLM head; harmjax loads causal LMs "
            f"of the families {', '.join(SUPPORTED_MODEL_TYPES)}."
        )


# Multimodal model_type -> (text tower model_type, the text-only causal-LM class). harmjax
# reads the text tower of such a checkpoint and exports it as that text-only model.
MULTIMODAL_TEXT_TOWERS = {"gemma3": ("gemma3_text", "Gemma3ForCausalLM")}


def text_tower_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config.json dict of a supported multimodal checkpoint (Gemma-3's
    Gemma3ForConditionalGeneration) as the config.json of its text tower alone; any other
    dict unchanged. Top-level dtype and tie_word_embeddings carry over when the nested
    text_config does not state them."""
    tower = MULTIMODAL_TEXT_TOWERS.get(config.get("model_type"))
    if tower is None:
        return config
    text = dict(config.get("text_config") or {})
    for key in ("dtype", "torch_dtype", "tie_word_embeddings"):
        if key in config and key not in text:
            text[key] = config[key]
    text.update(model_type=tower[0], architectures=[tower[1]])
    return text
def check_quantization(quantization_config: Any, model_type: str) -> None:
    """Raises UnsupportedArchitectureError for a quantized checkpoint harmjax cannot
    dequantize on load (only gpt-oss's MXFP4 expert weights are dequantized)."""
    if not quantization_config:
        return
    qc = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    method = qc.get("quant_method")
    if method != "mxfp4" or model_type != "gpt_oss":
        raise UnsupportedArchitectureError(
            f"This {model_type} checkpoint is quantized with quant_method={method!r}, which harmjax "
            "cannot dequantize (it reads float checkpoints and gpt-oss MXFP4); pass the unquantized model."
        )


def _moe_flags(c, model_type: str) -> dict[str, Any]:
    """The MoE fields of `ModelConfig` from a transformers config (empty for dense families)."""
    if model_type not in ("mixtral", "qwen3_moe", "gpt_oss"):
        return {}
    n = c.num_hidden_layers
    flags: dict[str, Any] = {"num_experts_per_tok": int(c.num_experts_per_tok)}
    if model_type == "qwen3_moe":
        step = int(getattr(c, "decoder_sparse_step", 1) or 1)
        dense = set(getattr(c, "mlp_only_layers", None) or ())
        flags.update(num_experts=int(c.num_experts), moe_intermediate_size=int(c.moe_intermediate_size),
                     norm_topk_prob=bool(c.norm_topk_prob))
        flags["moe_layers"] = tuple(i not in dense and c.num_experts > 0 and (i + 1) % step == 0 for i in range(n))
    else:
        flags.update(num_experts=int(c.num_local_experts), moe_intermediate_size=int(c.intermediate_size),
                     moe_layers=(True,) * n)
    if model_type == "gpt_oss":
        flags.update(router="topk_softmax", swiglu_limit=float(c.swiglu_limit),
                     swiglu_alpha=float(getattr(c, "swiglu_alpha", 1.702) or 1.702))
    return flags


def hf_config_from_dict(config: dict[str, Any]):
    """A transformers config object from a config.json dict, after checking the family
    (a multimodal checkpoint's dict gives its text tower's config, `text_tower_config`)."""
    import transformers

    config = text_tower_config(config)
    model_type = config.get("model_type")
    check_supported(model_type, config.get("architectures"))
    fields = {k: v for k, v in config.items() if k != "model_type"}
    return transformers.AutoConfig.for_model(model_type, **fields)


def _layer_types(c, model_type: str) -> tuple[str, ...]:
    n = c.num_hidden_layers
    hf_types = getattr(c, "layer_types", None)
    if hf_types:
        unknown = set(hf_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise UnsupportedArchitectureError(f"Layer types {sorted(unknown)} are not supported.")
        types = tuple("sliding" if t == "sliding_attention" else "full" for t in hf_types)
    elif model_type in _WINDOW_ON_EVERY_LAYER and getattr(c, "sliding_window", None):
        # Mistral, Mixtral and Phi-3 apply their window to every layer and have no layer_types.
        types = ("sliding",) * n
    else:
        types = ("full",) * n
    if "sliding" in types and not getattr(c, "sliding_window", None):
        types = ("full",) * n
    return types


def _rope_configs(c, model_type: str) -> tuple[RopeConfig, RopeConfig]:
    if hasattr(c, "standardize_rope_params"):
        c.standardize_rope_params()
    params = getattr(c, "rope_parameters", None)
    if params is None:  # transformers 4.x layout.
        params = dict(getattr(c, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(c, "rope_theta", 10000.0))
    if isinstance(params.get("full_attention"), dict):  # per-layer-type RoPE (OLMo-3)
        full = RopeConfig.from_hf(params["full_attention"], model_type)
        local = RopeConfig.from_hf(params.get("sliding_attention") or {}, model_type)
    else:
        full = local = RopeConfig.from_hf(params, model_type)
        if full.rope_type == "longrope" and params.get("factor") is None:
            # transformers' longrope: no factor means max_position_embeddings / original.
            original = full.original_max_position_embeddings or c.max_position_embeddings
            full = local = dataclasses.replace(full, factor=c.max_position_embeddings / original)
    if full.original_max_position_embeddings is None and full.rope_type in ("llama3", "yarn", "longrope"):
        full = dataclasses.replace(
            full,
            original_max_position_embeddings=int(getattr(c, "max_position_embeddings", 4096)),
        )
    return full, local
