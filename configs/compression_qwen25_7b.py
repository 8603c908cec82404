"""Claim 3 on the paper's Qwen pair: Qwen/Qwen2.5-7B (A, base) against Qwen/Qwen2.5-7B-Instruct
(B), with the paper's experiment settings (see configs/compression_llama31_8b.py).

  python -m launch.compression --config=configs/compression_qwen25_7b.py
"""

from configs._compression_paper import paper_pair


def get_config():
    """Settings for the Qwen2.5-7B base / instruct pair."""
    return paper_pair("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct", "qwen25-7b")
