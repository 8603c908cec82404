"""Utility benchmarks: how much general capability a (pruned) model keeps.

  perplexity(model, load_text_corpus("wikitext"))                  WikiText-2 perplexity
  multiple_choice_accuracy(model, load_mc_task("arc_challenge"))   zero-shot log-likelihood MC
  triviaqa_accuracy(model, load_triviaqa(limit=500))               alias match on greedy answers

Each takes `params=` (perplexity, multiple choice) or a model with other params
(`model.with_params(pruned)`), so a pruned copy is measured on the same mesh.
"""

from harmjax.evaluate.multiple_choice import (
    TASKS,
    MCItem,
    MCTask,
    choice_logprobs,
    encode_request,
    items_from_rows as mc_items_from_rows,
    load_mc_task,
    multiple_choice_accuracy,
)
from harmjax.evaluate.perplexity import (
    load_text_corpus,
    perplexity,
    rolling_windows,
    target_logprob_sums,
)
from harmjax.evaluate.triviaqa import (
    TriviaItem,
    alias_in,
    exact_match,
    first_segment,
    load_triviaqa,
    normalize_answer,
    triviaqa_accuracy,
    triviaqa_prompt,
)

__all__ = [
    "MCItem",
    "MCTask",
    "TASKS",
    "TriviaItem",
    "alias_in",
    "choice_logprobs",
    "encode_request",
    "exact_match",
    "first_segment",
    "load_mc_task",
    "load_text_corpus",
    "load_triviaqa",
    "mc_items_from_rows",
    "multiple_choice_accuracy",
    "normalize_answer",
    "perplexity",
    "rolling_windows",
    "target_logprob_sums",
    "triviaqa_accuracy",
    "triviaqa_prompt",
]
