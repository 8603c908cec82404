"""Tiny random mixture-of-experts models built with transformers, the reference of test_moe.

float32, hidden 64, 2-3 layers, 4-8 experts, top-2. Norm weights and every bias (router, expert
and attention biases, gpt-oss sinks) are perturbed away from their constant init so a dropped
bias or sink shows.
"""

from __future__ import annotations

import torch
import transformers

from tests.hf_reference import _COMMON

MOE_FAMILIES: dict[str, dict] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2),
    # Layer 1 is a dense MLP (mlp_only_layers); norm_topk_prob off exercises the raw top-k weights.
    "qwen3_moe": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1],
        norm_topk_prob=False, head_dim=24, num_hidden_layers=3,
    ),
    # Alternating sliding window (5) and full layers, sinks, biases, YaRN, clamped SwiGLU; a
    # small limit so the clamp is active on these random weights.
    "gpt_oss": dict(
        num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=5, num_hidden_layers=2,
        swiglu_limit=0.5,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0},
    ),
}


def tiny_moe_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny random transformers MoE causal LM of `family`, eval mode, float32."""
    torch.manual_seed(seed)
    kwargs = {**_COMMON, **MOE_FAMILIES[family], **overrides}
    config = transformers.AutoConfig.for_model(family, **kwargs)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or name.endswith("sinks"):
                p.add_(torch.randn_like(p) * 0.3)
            if name.endswith(("gate.weight", "router.weight")):
                p.normal_(0.0, 0.5)  # decisive routing, so fp32 rounding does not flip top-k picks
    return model
