"""The main experiment's settings turned into what its stages use: the candidates' fraction, the
generation prompts, the judge and utility callables, masked params and evaluation file names."""

from __future__ import annotations

import os


def candidate_fraction(cfg) -> float | None:
    """The fraction of each matrix the scores stage keeps per score tree (the largest q,
    category_q and p the masks use), or None when it must keep dense trees: on request
    (`scoring.keep_dense_scores`) or for granularity "row"/"global", which per-matrix
    candidates cannot serve."""
    masks_cfg = cfg.masks
    if cfg.scoring.keep_dense_scores or masks_cfg.granularity != "matrix":
        return None
    return float(max([*masks_cfg.q_sweep, masks_cfg.category_q, masks_cfg.p]))


def masked_params(model, mask_dir: str | None):
    """The model's params with the mask in `mask_dir` applied (the params as they are for None)."""
    if not mask_dir:
        return model.params
    from harmjax.masks import apply_mask, load_mask

    return apply_mask(model.params, load_mask(mask_dir, model.params)[0])


def evaluation_file(entry) -> str:
    """The evaluation unit's file stem of a mask entry ("unpruned" for the unmasked model)."""
    return "unpruned" if entry.get("kind") == "none" else os.path.basename(entry["dir"])


def generation_subset(held, rows, n: int):
    """The first `n` held-out harmful prompts with a usable answer, round-robin over categories
    so every category is represented."""
    if not n:
        return []
    by_cat: dict[str, list] = {}
    for e in held:
        r = rows[e.id]
        if r["response"].strip() and not r["refused"]:
            by_cat.setdefault(e.category, []).append(e)
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in by_cat.values()):
        for cat in sorted(by_cat):
            if i < len(by_cat[cat]) and len(out) < n:
                out.append(by_cat[cat][i])
        i += 1
    return out


def judge_fn(judge_cfg, model):
    """The StrongREJECT fine-tuned evaluator as a callable, when its local files are given."""
    if not judge_cfg.finetuned_base:
        return None
    from harmjax.evaluate.jobs import finetuned_scorer
    from harmjax.io.hf import resolve_checkpoint

    # Local directories, or hub ids found in the hub cache (or fetched where the hub is reachable).
    base, adapter = resolve_checkpoint(judge_cfg.finetuned_base), resolve_checkpoint(judge_cfg.finetuned_adapter)
    return finetuned_scorer(base, adapter, judge_cfg.template or None, dtype=judge_cfg.dtype, mesh=model.mesh,
                            max_response_tokens=judge_cfg.max_response_tokens, batch_size=judge_cfg.batch_size)


def utility_fn(utility_cfg, model):
    """Zero-shot multiple-choice accuracies as a callable params -> metrics, when tasks are given."""
    if not utility_cfg.mc_tasks:
        return None
    from harmjax.evaluate import load_mc_task, multiple_choice_accuracy
    from harmjax.evaluate.jobs import parse_mc_paths

    paths = parse_mc_paths(utility_cfg.mc_paths)
    tasks = {t: load_mc_task(t, paths.get(t), limit=utility_cfg.limit or None)
             for t in utility_cfg.mc_tasks.split(",") if t}

    def run(params):
        return {f"mc_{t}": multiple_choice_accuracy(model, items, batch_size=utility_cfg.batch_size,
                                                    params=params)["acc"]
                for t, items in tasks.items()}

    return run
