"""The baselines comparison on the paper's Llama-3.1-8B-Instruct at the
paper's settings (configs/_paper.py): bfloat16, FSDP over every local device, q=1e-5, p=5e-5,
the prefilling attack, 256 new tokens, the whole over-refusal set.

  python -m launch.baselines --config=configs/baselines_llama31_8b.py \\
      [--config.models='("/path/to/Llama-3.1-8B-Instruct",)']

This model refuses by itself, so no refusal-tuned variant is compared (`models` takes more
sources). The prompt split is the refusal block's over every StrongREJECT prompt: the
pruning, retain and direction-validation prompts from its training side, the held-out ones
never scored. Not run here (no 8B weights can be downloaded).
"""

from configs import baselines_embedded
from configs._paper import paper_config


def get_config():
    """Settings for Llama-3.1-8B-Instruct."""
    c = baselines_embedded.get_config()
    paper = paper_config("meta-llama/Llama-3.1-8B-Instruct")
    c.models = ("meta-llama/Llama-3.1-8B-Instruct",)
    c.labels = ("Llama-3.1-8B-Instruct",)
    c.dtype, c.mesh = paper.dtype, paper.mesh
    c.refusal.prompts.per_category = 0  # every StrongREJECT prompt and benign instruction in the split
    c.refusal.prompts.benign_per_category = 0
    c.refusal.data.harmful_per_category = 0

    c.prompts.pruning_per_category = 32  # the rest of the training side validates the direction
    c.prompts.heldout_per_category = 0  # every held-out prompt
    c.prompts.retain_per_category = 16
    c.prompts.benign_heldout_per_category = 0

    c.answers.max_new_tokens = paper.answers.max_new_tokens
    c.answers.batch_size = paper.answers.batch_size
    c.answers.chunk = paper.answers.chunk
    c.answers.harmful_min_words = 40
    c.answers.explanation_tokens = 64

    s = c.scoring
    s.text_format = "chat"  # the refusal direction and the attack read chat-formatted prompts
    s.max_length = paper.scoring.max_length
    s.batch_size, s.num_buckets, s.abs_chunk = paper.scoring.batch_size, paper.scoring.num_buckets, paper.scoring.abs_chunk
    s.remat = True

    c.masks.q, c.masks.p = 1e-5, 5e-5  # the paper's

    e = c.evaluation
    e.max_length = paper.evaluation.max_length
    e.batch_size = paper.evaluation.batch_size
    e.max_new_tokens = 64  # refusal shows in the first words; the NLLs read the 256-token answers
    e.generation_batch_size = paper.evaluation.generation_batch_size
    e.refusal_min_words = paper.evaluation.refusal_min_words
    e.heldout_per_category = e.benign_heldout_per_category = 0  # every held-out prompt

    c.direction.positions = 0  # Arditi: every post-instruction position of every layer below 80%
    c.direction.layer_stride = 1

    c.direction.val_per_category = 8
    c.direction.batch_size = 16
    c.direction.max_new_tokens = 64
    c.direction.generation_batch_size = 64

    c.over_refusal.safe_per_kind = 0  # the whole set, with its unsafe contrasts
    c.over_refusal.contrasts = True
    c.over_refusal.max_new_tokens = paper.over_refusal.max_new_tokens
    return c
