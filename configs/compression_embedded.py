"""Claim 3 on the embedded default: SmolLM2-135M-Instruct (A) against its refusal-tuned
variant made by harmjax (B, configs/refusal_embedded.py), the main job's experiment on each.

  python -m launch.compression --config=configs/compression_embedded.py
  python -m launch.compression --config=configs/compression_embedded.py \
      --config.model_a.output_dir=runs/experiment-SmolLM2-135M-Instruct   # reuse the main job's caches

The experiment keeps the main job's prompts, answers and scores (so a main-job run directory
serves model A's answers and scores from its cache); the q sweep starts lower, to place the
crossing of the harm target, and the random control is off (it does not enter the figure).
"""

import ml_collections

from configs import embedded, refusal_embedded


def get_config() -> ml_collections.ConfigDict:
    """Settings of `harmjax.experiments.compression.run.run_compression`."""
    c = ml_collections.ConfigDict()
    c.output_dir = ""  # "" = runs/compression-<A label>-<B label>
    # Each model: a label, a model source ("refusal" = the refusal-tuned model of the `refusal`
    # block, made on first use) and its experiment's run directory ("" = <output_dir>/<label>).
    c.model_a = ml_collections.ConfigDict({"label": "original", "model": "embedded", "output_dir": ""})
    c.model_b = ml_collections.ConfigDict({"label": "refusal-tuned", "model": "refusal", "output_dir": ""})

    e = c.experiment = embedded.get_config()  # shared by both models; its `model` and `output_dir` are set per model
    # Largest q 1e-4 as in the main job: the scores stage keys on it, so a main-job run keeps its scores.
    e.masks.q_sweep = (3e-6, 6e-6, 1e-5, 2e-5, 4e-5, 1e-4)
    e.masks.random_control = False
    e.baselines.enabled = False  # claim 2's baselines do not enter the compression figure
    e.over_refusal.enabled = False  # nor does over-refusal (the main job's own run measures it)
    e.evaluation.generation_prompts = 8

    # The refusal tuning; run_compression gives it the experiment's prompts and seed, so that
    # the tuned model never trains on the experiment's held-out prompts. Its run directory
    # ("" = runs/refusal-<model name>) is the one launch.refusal_tune uses: one model for both.
    c.refusal = refusal_embedded.get_config()

    c.compression = ml_collections.ConfigDict()
    c.compression.harm_target = 0.5  # nats/token rise of the held-out harmful NLL
    c.compression.benign_budget = 0.25  # nats/token rise of the held-out benign NLL allowed
    return c
