"""The paper's experiment end to end, as cached stages (see `harmjax.experiments.core.stages`):

  prompts  -> answers  -> scores  -> masks  -> evaluation  -> baselines  -> over_refusal -> report
  (split)     (greedy,     (harm per   (q sweep,  (per mask:   (benign \\     (harmless      (report.md,
              refusals     category,   random,    NLLs,        retain at      prompts that   metrics.json,
              attacked)    retain +    category,  refusals,    category_q     sound harmful, plots,
                           benign)     benign)    samples)     and matched)   chosen masks)  summary)

`run_experiment(cfg)` takes the settings of `configs/embedded.py` (an ml_collections
ConfigDict, or a nested dict with the same fields) and returns the metrics dict it writes.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from harmjax.attribution.core import check_kinds
from harmjax.experiments.core import answers as answers_mod
from harmjax.experiments.core.prompt_sets import (
    load_benign_prompts, load_harmful_prompts, load_pruning_prompts, split_per_category,
)
from harmjax.experiments.core.scoring import (
    benign_scores, check_score_disk, experiment_score_units, harm_scores_per_category, scan_kwargs, score_settings,
    selection_key,
)
from harmjax.experiments.core.stages import (
    ExperimentRun, StageCache, as_config, default_run_dir, examples_digest, settings_key, write_json_atomic,
)
from harmjax.experiments.main.masks import build_masks, mask_overlap
from harmjax.experiments.main.settings import candidate_fraction


@dataclasses.dataclass
class MainRun(ExperimentRun):
    """One run of the experiment: its config, model and stage cache, and what each stage leaves
    for the ones after it (prompt sets, answer rows, examples, stage settings and infos)."""

    prompts: dict[str, list] = dataclasses.field(default_factory=dict)
    rows: dict[str, dict[str, dict]] = dataclasses.field(default_factory=dict)
    examples: dict[str, list] = dataclasses.field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    score_units: dict[str, str] = dataclasses.field(default_factory=dict)
    masks: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def run_experiment(cfg, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) the whole experiment and writes the report; returns its metrics."""
    from harmjax.experiments.main import evaluation

    t_start = time.perf_counter()
    run = start(cfg, progress)
    prompt_sets(run)
    answers(run)
    scores(run)
    masks(run)
    plan = evaluation.EvaluationPlan.of(run)
    results = evaluation.evaluate_masks(run, plan)
    baselines = evaluation.benign_baselines(run, plan, results)
    over_refusal = evaluation.over_refusal(run)
    return evaluation.report(run, plan, results, baselines, t_start, over_refusal)


def start(cfg, progress: bool) -> MainRun:
    """The run directory, its stage cache and the loaded model."""
    from harmjax.assets import resolve_model_source
    from harmjax.experiments.core.model_sources import load_model

    cfg = as_config(cfg)
    # A slip in the retain kind: one line now, not after the harm scans. The retain pass also
    # scores signed SNIP ("harm"), so the kind must be another one.
    check_kinds((cfg.scoring.retain_kind, "harm"))
    source = resolve_model_source(cfg.model)
    run_dir = cfg.output_dir or default_run_dir(source)
    os.makedirs(run_dir, exist_ok=True)
    stages = StageCache(run_dir)
    model, load_seconds, model_id = load_model(cfg, source)
    return MainRun(cfg, source, model, model_id, stages, progress, load_seconds)


def prompt_sets(run: MainRun) -> None:
    """Harmful prompts split per category into pruning and held-out, the extra pruning set,
    benign prompts split into retain and held-out; their ids written to prompts.json."""
    prompts_cfg, seed = run.cfg.prompts, run.cfg.seed
    harmful = load_harmful_prompts(prompts_cfg.harmful, prompts_cfg.prompt_key, prompts_cfg.category_key)
    prune_h, held_h = split_per_category(harmful, prompts_cfg.per_category, prompts_cfg.heldout_fraction, seed)
    extra = load_pruning_prompts(prompts_cfg.pruning_extra, prompts_cfg.pruning_extra_key,
                                 prompts_cfg.pruning_extra_limit, seed) if prompts_cfg.pruning_extra else []
    benign = load_benign_prompts(prompts_cfg.benign, prompts_cfg.benign_prompt_key)
    retain_b, held_b = split_per_category(benign, prompts_cfg.benign_per_category,
                                          prompts_cfg.benign_heldout_fraction, seed)
    write_json_atomic(os.path.join(run.dir, "prompts.json"), {
        "pruning": [e.id for e in prune_h + extra], "heldout": [e.id for e in held_h],
        "retain": [e.id for e in retain_b], "benign_heldout": [e.id for e in held_b],
    })
    run.prompts.update(harmful=harmful, prune=prune_h, held=held_h, extra=extra, retain=retain_b, held_benign=held_b)


def answers(run: MainRun) -> None:
    """The model's own greedy answers to every prompt (refusals asked again under the attack)."""
    answers_cfg, p, model = run.cfg.answers, run.prompts, run.model
    harmful_all, benign_all = p["prune"] + p["held"] + p["extra"], p["retain"] + p["held_benign"]
    settings = {"model": run.model_id, "harmful": examples_digest(harmful_all), "benign": examples_digest(benign_all),
                **answers_cfg.to_dict()}

    def answer_stage(d):
        kw = dict(max_new_tokens=answers_cfg.max_new_tokens, batch_size=answers_cfg.batch_size, chat=answers_cfg.chat,
                  system=answers_cfg.system, chunk=answers_cfg.chunk, min_words=answers_cfg.min_words)
        h = answers_mod.generate_answers(model, harmful_all, os.path.join(d, "harmful.jsonl"),
                                         attack_prefix=answers_cfg.attack_prefix, desc="harmful answers", **kw)
        b = answers_mod.generate_answers(model, benign_all, os.path.join(d, "benign.jsonl"),
                                         attack_refusals=False, desc="benign answers", **kw)
        return {"harmful": len(h), "benign": len(b),
                "harmful_attacked": sum(r["attacked"] for r in h),
                "harmful_refused_dropped": sum(r["refused"] for r in h),
                "benign_refused": sum(r["refused"] for r in b)}

    run.info["answers"] = run.stages.run("answers", settings, answer_stage)
    run.settings["answers"] = settings
    ans_dir = run.stages.path("answers", settings)
    rows_h = {r["id"]: r for r in answers_mod.read_rows(os.path.join(ans_dir, "harmful.jsonl"))}
    rows_b = {r["id"]: r for r in answers_mod.read_rows(os.path.join(ans_dir, "benign.jsonl"))}
    run.rows.update(harmful=rows_h, benign=rows_b)

    def examples(ids_from, rows, drop_refused=True):
        return answers_mod.as_examples([rows[e.id] for e in ids_from], drop_refused=drop_refused)

    run.examples.update(prune=examples(p["prune"] + p["extra"], rows_h), held=examples(p["held"], rows_h),
                        retain=examples(p["retain"], rows_b, drop_refused=False),
                        held_benign=examples(p["held_benign"], rows_b, drop_refused=False))


def scores(run: MainRun) -> None:
    """Signed SNIP per harm category and over the whole pruning set, the retain score and the
    benign signed score (`harmjax.experiments.core.scoring`)."""
    scoring_cfg, model = run.cfg.scoring, run.model
    top_fraction = candidate_fraction(run.cfg)
    # "harm_all": how the pruning set's score is made (since 2026-11-30 one scan over it, not the
    # sum of the category trees), so runs scored the old way rescore once.
    settings = {"answers": settings_key(run.settings["answers"]), **score_settings(scoring_cfg),
                "top_fraction": top_fraction, "harm_all": "scan", **selection_key(model.config)}
    summary = {"model": run.source, "seed": run.cfg.seed, "text_format": scoring_cfg.text_format}
    scan_kw = scan_kwargs(scoring_cfg, run.progress)
    ex_prune, ex_retain = run.examples["prune"], run.examples["retain"]

    def score_stage(d):
        # A two-kind retain pass checkpoints two trees at once (dense mode only).
        check_score_disk(model, d, experiment_score_units(ex_prune), checkpoint_trees=2, top_fraction=top_fraction)
        harm_units = harm_scores_per_category(model, ex_prune, d, scan_kw, summary, top_fraction=top_fraction)
        ben_units = benign_scores(model, ex_retain, d, scoring_cfg.retain_kind, scan_kw, summary,
                                  top_fraction=top_fraction, separate_passes=scoring_cfg.separate_retain_passes)
        return {"units": {k: os.path.basename(v) for k, v in {**harm_units, **ben_units}.items()}}

    info = run.stages.run("scores", settings, score_stage)
    run.settings["scores"] = settings
    sc_dir = run.stages.path("scores", settings)
    run.score_units = {k: os.path.join(sc_dir, v) for k, v in info["units"].items()}


def masks(run: MainRun) -> None:
    """The q sweep of harm masks with random controls, the category masks and the benign mask."""
    masks_cfg, seed = run.cfg.masks, run.cfg.seed
    settings = {"scores": settings_key(run.settings["scores"]), **masks_cfg.to_dict(), "seed": seed}

    def mask_stage(d):
        entries = build_masks(run.model, run.score_units, d, q_sweep=list(masks_cfg.q_sweep), p=masks_cfg.p,
                              category_q=masks_cfg.category_q, granularity=masks_cfg.granularity, seed=seed,
                              random_control=masks_cfg.random_control, dense_copy=masks_cfg.dense_copy,
                              progress=run.progress)
        overlap = mask_overlap(run.model, entries)
        for e in entries:
            e["dir"] = os.path.basename(e["dir"])
        return {"masks": entries, "overlap": overlap}

    run.info["masks"] = run.stages.run("masks", settings, mask_stage)
    run.settings["masks"] = settings
    mk_dir = run.stages.path("masks", settings)
    run.masks = [{**e, "dir": os.path.join(mk_dir, e["dir"])} for e in run.info["masks"]["masks"]]


__all__ = ["candidate_fraction", "default_run_dir", "run_experiment"]
