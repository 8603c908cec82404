"""The experiment's disk needs at the paper's settings (configs/_paper.py) for the three paper
models and the two MoE configs, from their shapes alone (no weights, no device): the README's
disk table, and the parameter and accumulator sizes of docs/experiments.md's MoE section.

  python -m benchmarks.disk_budget
"""

from configs import _paper
from harmjax.config import ModelConfig
from harmjax.io.disk_space import human_bytes
from harmjax.experiments.main.disk_budget import experiment_output_bytes
from harmjax.model.param_specs import num_params

# Shapes from each model's config.json (the sizes that set the scored matrices).
MODELS = {
    "Llama-3.1-8B-Instruct": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "Qwen2.5-14B-Instruct": dict(model_type="qwen2", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                                 num_attention_heads=40, num_key_value_heads=8, vocab_size=152064),
    "Qwen2.5-32B-Instruct": dict(model_type="qwen2", hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                                 num_attention_heads=40, num_key_value_heads=8, vocab_size=152064),
}
# The MoE configs' models (config.json shapes; expert widths set the scored matrices).
MOE_MODELS = {
    "gpt-oss-20b": dict(model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                        num_experts_per_tok=4, vocab_size=201088, sliding_window=128, rope_theta=150000,
                        layer_types=["sliding_attention", "full_attention"] * 12),
    "Qwen3-30B-A3B-Instruct-2507": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                                        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                                        vocab_size=151936, mlp_only_layers=[]),
}
COMMON = dict(rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False,
              hidden_act="silu")
CATEGORIES = 7  # StrongREJECT's 6 + the AdvBench pruning prompts ("extra")


def main():
    cfg = _paper.paper_config("shapes-only")
    print("| model | scored weights | scores (default) | masks (default) | one dense float32 tree | "
          "keep_dense_scores | one dense uint8 mask |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, shape in {**MODELS, **MOE_MODELS}.items():
        config = ModelConfig.from_hf({**COMMON, **shape})
        cfg.scoring.keep_dense_scores = False
        sparse = experiment_output_bytes(config, cfg, CATEGORIES)
        cfg.scoring.keep_dense_scores = True
        dense = experiment_output_bytes(config, cfg, CATEGORIES)
        print(f"| {name} | {sparse['scored'] / 1e9:.2f} B | {human_bytes(sparse['scores'])} | "
              f"{human_bytes(sparse['masks'])} | {human_bytes(sparse['dense_tree'])} | {human_bytes(dense['scores'])} | "
              f"{human_bytes(sparse['dense_mask'])} |")
    print("\n| MoE model | parameters | bfloat16 weights | scored weights | one float32 accumulator tree |")
    print("| --- | --- | --- | --- | --- |")
    for name, shape in MOE_MODELS.items():
        config = ModelConfig.from_hf({**COMMON, **shape})
        n, scored = num_params(config), experiment_output_bytes(config, cfg, CATEGORIES)["scored"]
        print(f"| {name} | {n / 1e9:.2f} B | {human_bytes(2 * n)} | {scored / 1e9:.2f} B | {human_bytes(4 * scored)} |")


if __name__ == "__main__":
    main()
