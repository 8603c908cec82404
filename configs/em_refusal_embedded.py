"""The emergent-misalignment experiment on the refusal-tuned SmolLM2-135M-Instruct (issue 13
part 4): a model that refuses, so that the judge-free EM measures can be seen. After narrow
harmful fine-tuning, its refusal rate on the OTHER harm categories drops (harmful compliance
rises); pruning the harm weights first (the paper's protocol) should shrink that drop.

  python -m launch.finetune --config=configs/em_refusal_embedded.py

model "refusal" is the refusal-tuned model of the `refusal` block (configs/refusal_embedded.py,
made on first use and shared with launch.refusal_tune and launch.compression). The
other-category prompts are drawn only from those the refusal tuning held out. The report gives,
for original, fine-tuned, pruned and pruned + fine-tuned models, the keyword refusal rate on
those prompts (greedy, no attack) with Wilson 95% intervals and its change against the
original with Newcombe 95% intervals. Everything else is configs/em_embedded.py.
"""

import ml_collections

from configs import em_embedded, refusal_embedded


def get_config() -> ml_collections.ConfigDict:
    """Settings of the EM experiment on the refusal-tuned embedded model."""
    c = em_embedded.get_config()
    c.model = "refusal"
    c.refusal = refusal_embedded.get_config()
    x = c.experiment_data
    x.other_per_category = 10  # of the refusal tuning's held-out prompts (about 13 per category)
    e = c.em
    e.judge = "embedded"  # the original model judges, not the tuned one (see em_embedded: a weak judge)
    e.other_generations = 50  # prompts for the refusal rate (round-robin over the 5 other categories)
    e.other_max_new_tokens = 40
    e.refusal_min_words = 10  # keyword rule for 40-token answers (~30 words), as the refusal tuning's evaluation
    return c
