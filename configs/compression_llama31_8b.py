"""Claim 3 on the paper's Llama pair: meta-llama/Llama-3.1-8B (A, base) against
meta-llama/Llama-3.1-8B-Instruct (B), with the paper's experiment settings
(configs/llama31_8b_instruct.py: bfloat16, FSDP over local devices, 412 AdvBench pruning
prompts, 256 new tokens, prefilling attack, StrongREJECT judge).

  python -m launch.compression --config=configs/compression_llama31_8b.py \
      [--config.model_a.model=/path/to/Llama-3.1-8B --config.model_b.model=/path/to/Llama-3.1-8B-Instruct]

Both models answer through the chat template of their own tokenizer (answers.chat): a base
checkpoint without one stops at the answers stage with an error naming chat=False. Not run here
(no 8B weights can be downloaded); the targets below are choices, not the paper's.
"""

from configs._compression_paper import paper_pair


def get_config():
    """Settings for the Llama-3.1-8B base / instruct pair."""
    return paper_pair("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", "llama31-8b")
