"""The experiment's disk needs at the paper's settings (configs/_paper.py) for the three paper
models, from their shapes alone (no weights, no device): the README's disk table.

  python -m benchmarks.disk_budget
"""

from configs import _paper
from harmjax.config import ModelConfig
from harmjax.io.disk_space import human_bytes
from harmjax.experiments.main.disk_budget import experiment_output_bytes

# Shapes from each model's config.json (the sizes that set the scored matrices).
MODELS = {
    "Llama-3.1-8B-Instruct": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "Qwen2.5-14B-Instruct": dict(model_type="qwen2", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                                 num_attention_heads=40, num_key_value_heads=8, vocab_size=152064),
    "Qwen2.5-32B-Instruct": dict(model_type="qwen2", hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                                 num_attention_heads=40, num_key_value_heads=8, vocab_size=152064),
}
COMMON = dict(rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False,
              hidden_act="silu")
CATEGORIES = 7  # StrongREJECT's 6 + the AdvBench pruning prompts ("extra")


def main():
    cfg = _paper.paper_config("shapes-only")
    print("| model | scored weights | scores (default) | masks (default) | one dense float32 tree | "
          "keep_dense_scores | one dense uint8 mask |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, shape in MODELS.items():
        config = ModelConfig.from_hf({**COMMON, **shape})
        cfg.scoring.keep_dense_scores = False
        sparse = experiment_output_bytes(config, cfg, CATEGORIES)
        cfg.scoring.keep_dense_scores = True
        dense = experiment_output_bytes(config, cfg, CATEGORIES)
        print(f"| {name} | {sparse['scored'] / 1e9:.2f} B | {human_bytes(sparse['scores'])} | "
              f"{human_bytes(sparse['masks'])} | {human_bytes(sparse['dense_tree'])} | {human_bytes(dense['scores'])} | "
              f"{human_bytes(sparse['dense_mask'])} |")


if __name__ == "__main__":
    main()
