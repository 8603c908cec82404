"""The paper's setup (Orgad et al. 2026) for the end-to-end experiment, shared by the per-model
configs: q=1e-5, p=5e-5 per matrix, 412 pruning samples (AdvBench, on top of StrongREJECT's
pruning split), 256 new tokens, the prefilling attack with 10 tokens, and the StrongREJECT
fine-tuned evaluator, in bfloat16 with the parameters split over every local device.
"""

from configs import embedded


def paper_config(model: str):
    """The experiment settings for `model` (a hub id or a local directory)."""
    c = embedded.get_config()
    c.model = model
    c.dtype = "bfloat16"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1

    c.prompts.per_category = 0  # all 313 StrongREJECT prompts
    c.prompts.heldout_fraction = 0.5
    # The paper's pruning set: 412 AdvBench prompts (harmful_behaviors.csv: a local path, or the
    # hub dataset when cached) with the model's own answers.
    c.prompts.pruning_extra = "walledai/AdvBench"
    c.prompts.pruning_extra_key = "prompt"
    c.prompts.pruning_extra_limit = 412
    c.prompts.benign_per_category = 0  # all 132 benign instructions
    c.prompts.benign_heldout_fraction = 0.25

    c.answers.max_new_tokens = 256
    c.answers.batch_size = 64
    c.answers.chunk = 256

    c.scoring.text_format = "raw"  # the reference's prompt + "\n" + response
    c.scoring.max_length = 512
    c.scoring.batch_size = 16
    c.scoring.num_buckets = 4
    c.scoring.abs_chunk = 4
    c.scoring.checkpoint_every = 20  # used with keep_dense_scores only (a dense checkpoint is 4 B per weight)
    # Device memory (docs/design_runs.md "Memory preflight"): remat, and the retain set scored in two passes
    # (retain, then benign signed) so a scan holds one float32 accumulator tree, not two: at 8B
    # two trees (52 GiB) plus the params (15 GiB) already fill an 80 GB card.
    c.scoring.remat = True
    c.scoring.separate_retain_passes = True

    c.masks.p = 5e-5
    c.masks.q_sweep = (2e-6, 5e-6, 1e-5, 2e-5, 5e-5)
    c.masks.category_q = 1e-5
    c.masks.headline_q = 1e-5

    c.evaluation.max_length = 512
    c.evaluation.batch_size = 16
    c.evaluation.generation_prompts = 157  # every held-out StrongREJECT prompt
    c.evaluation.max_new_tokens = 256
    c.evaluation.generation_batch_size = 64
    c.evaluation.prefill_tokens = 10
    c.evaluation.refusal_min_words = 20
    c.evaluation.category_benign = True
    c.evaluation.random_generations = True

    c.over_refusal.safe_per_kind = 0  # the whole set
    c.over_refusal.max_new_tokens = 64
    c.over_refusal.masks = "all"

    c.judge.finetuned_base = "google/gemma-2b"
    c.judge.finetuned_adapter = "qylu4156/strongreject-15k-v1"

    c.utility.mc_tasks = "boolq,rte,hellaswag,winogrande,arc_challenge,openbookqa"
    c.utility.limit = 1000
    return c
