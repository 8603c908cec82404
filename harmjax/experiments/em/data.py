"""The EM experiment's data: the narrow domain (a chat file, or one StrongREJECT category with
the model's own answers) split into fine-tuning and held-out prompts, the other harm categories,
and the benign retain set."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from harmjax.data.records import Example
from harmjax.experiments.core.prompt_sets import load_benign_prompts, load_harmful_prompts, split_per_category


@dataclasses.dataclass
class EmPrompts:
    """The EM experiment's prompt sets (see the module docstring)."""

    narrow_train: list[Example]
    narrow_held: list[Example]
    other_eval: list[Example]
    refusal_prompts: list[Example]
    retain: list[Example]


def round_robin(examples):
    """`examples` reordered one category at a time (categories sorted), so that any prefix of
    the result spreads over every category."""
    by_cat: dict[str, list] = {}
    for e in examples:
        by_cat.setdefault(e.category, []).append(e)
    out, i = [], 0
    while len(out) < len(examples):
        for cat in sorted(by_cat):
            if i < len(by_cat[cat]):
                out.append(by_cat[cat][i])
        i += 1
    return out


def narrow_and_others(data_cfg) -> tuple[list[Example], list[Example]]:
    """(narrow-domain examples, harmful prompts of the other categories)."""
    harmful = load_harmful_prompts(data_cfg.harmful, data_cfg.prompt_key, data_cfg.category_key)
    if data_cfg.narrow_data:
        from harmjax.data.loaders import load_chat_jsonl

        narrow = load_chat_jsonl(data_cfg.narrow_data)
        narrow = [Example(prompt=e.prompt, response=e.response, category="narrow", id=f"n{i:05d}")
                  for i, e in enumerate(narrow)]
        return narrow, harmful
    narrow = [e for e in harmful if e.category == data_cfg.narrow_category]
    if not narrow:
        raise ValueError(f"No StrongREJECT prompts in category {data_cfg.narrow_category!r}; categories: "
                         f"{sorted({e.category for e in harmful})}.")
    return narrow, [e for e in harmful if e.category != data_cfg.narrow_category]


def em_prompts(data_cfg, seed: int, refusal_held: Callable[[], set[str]] | None) -> EmPrompts:
    """The prompt sets from the config's `experiment_data` block; with `refusal_held` (giving the
    ids the refusal tuning never trained on), the other categories only from those."""
    narrow, others = narrow_and_others(data_cfg)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(narrow))[: data_cfg.narrow_limit or len(narrow)]
    n_held = max(1, int(round(data_cfg.narrow_heldout_fraction * len(order))))
    narrow_held = [narrow[i] for i in sorted(order[:n_held])]
    narrow_train = [narrow[i] for i in sorted(order[n_held:])]
    if refusal_held is not None:  # measure on prompts the refusal tuning never trained on
        held = refusal_held()
        others = [e for e in others if e.id in held]
        if not others:
            raise ValueError("None of the other-category prompts was held out of the refusal tuning: check that "
                             "experiment_data.harmful and refusal.prompts.harmful name the same prompts.")
    other_eval, _ = split_per_category(others, data_cfg.other_per_category, 0.0, seed)
    benign = load_benign_prompts(data_cfg.benign, data_cfg.benign_prompt_key)
    retain, _ = split_per_category(benign, data_cfg.benign_per_category, 0.0, seed)
    return EmPrompts(narrow_train, narrow_held, other_eval, round_robin(other_eval), retain)
