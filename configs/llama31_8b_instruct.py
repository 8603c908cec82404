"""The paper's experiment on Llama-3.1-8B-Instruct (bfloat16, FSDP over every local device).

  python -m launch.run --config=configs/llama31_8b_instruct.py
Runs where the weights are available: the hub id (hub access or cache) or
--config.model=/path/to/Llama-3.1-8B-Instruct.
"""

from configs._paper import paper_config


def get_config():
    """The experiment settings for Llama-3.1-8B-Instruct."""
    return paper_config("meta-llama/Llama-3.1-8B-Instruct")
