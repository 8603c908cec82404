"""The paper's experiment on Qwen2.5-32B-Instruct (bfloat16; tensor parallelism over
each host's GPUs, FSDP across hosts).

  python -m launch.run --config=configs/qwen25_32b_instruct.py
Runs where the weights are available: the hub id (hub access or cache) or
--config.model=/path/to/Qwen2.5-32B-Instruct.
"""

from configs._paper import paper_config
from harmjax.sharding import HOST


def get_config():
    """The experiment settings for Qwen2.5-32B-Instruct."""
    c = paper_config("Qwen/Qwen2.5-32B-Instruct")
    # Heads and MLP split over the GPUs of a host, the rest FSDP: on 2 x H200 the harm scan ran
    # 1.1x (14B) and 1.2x (32B, remat) faster than FSDP 2, the retain scan 1.4x (with the fused
    # |grad| kernel, on by default under tensor parallelism). docs/design.md "Attribution: the fused |grad| kernel".
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, HOST
    c.scoring.remat = True  # activations of a 32B backward pass (also the paper default)
    # One program per decoder block: on 2 x H200 the scan steps compile in 4-16 s instead of
    # 17-43 s, with remat as fast and in less memory (docs/design.md "Attribution: per-block programs").
    c.scoring.layerwise = True
    return c
