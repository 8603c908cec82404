"""The paper's experiment on Qwen3-30B-A3B-Instruct-2507 (MoE: 48 layers x 128 experts, top-8;
bfloat16, FSDP over every local device).

  python -m launch.run --config=configs/qwen3_30b_a3b.py
Runs where the weights are available: the hub id (hub access or cache) or
--config.model=/path/to/Qwen3-30B-A3B-Instruct-2507.
Needs (docs/experiments.md "Mixture-of-experts models"): 30.5 B parameters, 57 GiB in bfloat16,
plus one float32 accumulator tree of the 29.9 B scored weights (111 GiB) per scan: four 80 GB
cards (or two H200); the run writes about 0.5 GiB of scores and masks.
"""

from configs._paper import paper_config


def get_config():
    """The experiment settings for Qwen3-30B-A3B-Instruct-2507."""
    return paper_config("Qwen/Qwen3-30B-A3B-Instruct-2507")
