"""The paper's experiment on gpt-oss-20b (MoE: 24 layers x 32 experts, top-4; bfloat16, FSDP
over every local device, the expert tensors split along their expert axis).

  python -m launch.run --config=configs/gpt_oss_20b.py
Runs where the weights are available: the hub id (hub access or cache) or
--config.model=/path/to/gpt-oss-20b. The MXFP4 expert weights are dequantized on load.
Needs (docs/experiments.md "Mixture-of-experts models"): 20.9 B parameters, 39 GiB in bfloat16,
plus one float32 accumulator tree of the 19.7 B scored weights (74 GiB) per scan: two 80 GB
cards (or one H200); the run writes about 0.2 GiB of scores and masks.
"""

from configs._paper import paper_config


def get_config():
    """The experiment settings for gpt-oss-20b."""
    return paper_config("openai/gpt-oss-20b")
