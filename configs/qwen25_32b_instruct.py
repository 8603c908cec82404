"""The paper's experiment on Qwen2.5-32B-Instruct (bfloat16, FSDP over every local device).

  python -m launch.run --config=configs/qwen25_32b_instruct.py
Runs where the weights are available: the hub id (hub access or cache) or
--config.model=/path/to/Qwen2.5-32B-Instruct.
"""

from configs._paper import paper_config


def get_config():
    """The experiment settings for Qwen2.5-32B-Instruct."""
    c = paper_config("Qwen/Qwen2.5-32B-Instruct")
    c.scoring.remat = True  # activations of a 32B backward pass (also the paper default)
    return c
