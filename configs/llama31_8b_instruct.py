"""Llama-3.1-8B-Instruct in bfloat16, parameters split over every local device (FSDP).

Runs where the weights are available: a local directory or the hub id (with hub access).
"""

from configs import embedded


def get_config():
    """The main job's settings for Llama-3.1-8B-Instruct."""
    c = embedded.get_config()
    c.model = "meta-llama/Llama-3.1-8B-Instruct"
    c.dtype = "bfloat16"
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.batch_size = 16
    return c
