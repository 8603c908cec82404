"""The compression comparison (claim 3) for a base / instruct pair at the paper's experiment
settings (configs/_paper.py), shared by configs/compression_llama31_8b.py and
configs/compression_qwen25_7b.py."""

import ml_collections

from configs._paper import paper_config


def paper_pair(base: str, instruct: str, name: str) -> ml_collections.ConfigDict:
    """Settings comparing `base` (model A) with `instruct` (model B), both hub ids or local dirs."""
    c = ml_collections.ConfigDict()
    c.output_dir = f"runs/compression-{name}"
    c.model_a = ml_collections.ConfigDict({"label": "base", "model": base, "output_dir": ""})
    c.model_b = ml_collections.ConfigDict({"label": "instruct", "model": instruct, "output_dir": ""})
    e = c.experiment = paper_config(instruct)  # `model` and `output_dir` are set per model
    # The paper's q=1e-5 in the middle of a sweep wide enough to place the crossing for both models.
    e.masks.q_sweep = (1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5)
    e.over_refusal.enabled = False  # not in the compression figure (the main job's own run measures it)
    c.refusal = None  # no "refusal" model here
    c.compression = ml_collections.ConfigDict()
    c.compression.harm_target = 0.5  # nats/token rise of the held-out harmful NLL
    c.compression.benign_budget = 0.1  # nats/token rise of the held-out benign NLL allowed
    return c
