"""Masks from score directories: T_q(harm) \\ T_p(retain), or the intersection of mask dirs.

Use:
  python -m launch.prune --config=configs/prune.py \
      --config.harm_scores=runs/scores_harm --config.retain_scores=runs/scores_retain \
      --config.output_dir=runs/mask_harm
  python -m launch.prune --config=configs/prune.py \
      --config.intersect="('runs/mask_cyber','runs/mask_bio')" --config.output_dir=runs/mask_shared
Reference settings (Orgad et al.): q=1e-5, p=5e-5 per matrix; EM: q=7e-6 (scripts) or 2e-5
(README), p=5e-5.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Settings of launch/prune.py."""
    c = ml_collections.ConfigDict()
    # score dir written by launch/score.py (scores/, scores.safetensors, summary.json), or a
    # candidates unit of the experiment's scores stage (granularity "matrix" only)
    c.harm_scores = ""
    c.retain_scores = ""  # score dir of the retain (utility) scores; "" = no T_p subtraction
    c.q = 1e-5  # fraction taken by harm score (per matrix, row, or of all scored weights)
    c.p = 5e-5  # fraction spared by retain score
    c.granularity = "matrix"  # "matrix" (reference), "row" or "global"
    c.sign_flip = False  # control: rank by -harm
    c.skip_first = False  # control: take harm ranks (k, 2k] instead of the top k
    # Mask dirs to intersect instead of selecting from scores (weights shared by all of them).
    c.intersect = ()
    c.dense_copy = False  # also write the dense uint8 mask.safetensors (as large as the model / 2 in bf16)
    c.output_dir = ""  # "" = runs/mask_<granularity>_q<q>_p<p> (or runs/mask_intersect)
    # Model (dir, hub id, "embedded") used for the fraction of all parameters and to shard the
    # scores like its weights; "" = the "model" recorded in the harm scores' summary.json.
    c.model = ""
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    return c
