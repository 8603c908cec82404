"""The main experiment's last stages: every mask evaluated (held-out NLLs, generations, judge,
utility), claim 2's benign baselines searched and evaluated, over-refusal of the unpruned model
and the chosen masks, and the report."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from tqdm import tqdm

from harmjax.experiments.core.stages import examples_digest, read_json, settings_key, write_json_atomic
from harmjax.experiments.main.baselines import build_baselines
from harmjax.experiments.main.measure import generation_metrics, measure, nll_metrics
from harmjax.experiments.main.settings import evaluation_file, generation_subset, judge_fn, masked_params, utility_fn
from harmjax.experiments.main.verdicts import headline_mask


@dataclasses.dataclass
class EvaluationPlan:
    """What every mask's evaluation shares: the generation prompts (and their prefill
    prefixes), the judge and utility callables, and the evaluation stage's settings."""

    gen_prompts: list
    prefixes: list[str] | None
    judge: Any
    utility: Any
    settings: dict[str, Any]

    @classmethod
    def of(cls, run) -> EvaluationPlan:
        """The plan of a `MainRun` whose masks are built."""
        cfg, eval_cfg = run.cfg, run.cfg.evaluation
        rows_h = run.rows["harmful"]
        gen_prompts = generation_subset(run.prompts["held"], rows_h, eval_cfg.generation_prompts)
        prefixes = None
        if eval_cfg.prefill_tokens:
            from harmjax.generate.prompts import response_prefix

            prefixes = [response_prefix(run.model.tokenizer, rows_h[e.id]["response"], eval_cfg.prefill_tokens)
                        for e in gen_prompts]
        settings = {"masks": settings_key(run.settings["masks"]), **eval_cfg.to_dict(), "judge": cfg.judge.to_dict(),
                    "utility": cfg.utility.to_dict()}
        return cls(gen_prompts, prefixes, judge_fn(cfg.judge, run.model), utility_fn(cfg.utility, run.model), settings)


def evaluate_masks(run, plan: EvaluationPlan) -> dict[str, Any]:
    """The evaluation stage: {mask name (and "unpruned"): metrics}, one unit file per mask."""
    eval_cfg, model = run.cfg.evaluation, run.model
    ex_held, ex_held_b = run.examples["held"], run.examples["held_benign"]

    def evaluate_stage(d):
        todo = [{"name": "unpruned", "kind": "none", "dir": None}] + run.masks
        results = {}
        for entry in tqdm(todo, desc="evaluate masks", unit="mask", disable=not run.progress):
            unit = os.path.join(d, f"{evaluation_file(entry)}.json")
            if os.path.isfile(unit):
                results[entry["name"]] = read_json(unit)
                continue
            kind = entry["kind"]
            params = masked_params(model, entry["dir"])
            full = kind in ("none", "harm", "random")
            generate = kind in ("none", "harm") or (kind == "random" and eval_cfg.random_generations)
            t0 = time.perf_counter()
            metrics = measure(
                model, params, ex_held, ex_held_b if (full or kind == "benign" or eval_cfg.category_benign) else None,
                plan.gen_prompts if generate and eval_cfg.generation_prompts else None,
                text_format=run.cfg.scoring.text_format, max_length=eval_cfg.max_length,
                batch_size=eval_cfg.batch_size, max_new_tokens=eval_cfg.max_new_tokens,
                generation_batch_size=eval_cfg.generation_batch_size,
                prefixes=plan.prefixes, judge=plan.judge if generate else None,
                utility=plan.utility if kind in ("none", "harm") else None,
                refusal_min_words=eval_cfg.refusal_min_words,
            )
            metrics["seconds"] = time.perf_counter() - t0
            write_json_atomic(unit, metrics)
            results[entry["name"]] = metrics
            del params
        return {"n": len(results)}

    run.stages.run("evaluation", plan.settings, evaluate_stage)
    ev_dir = run.stages.path("evaluation", plan.settings)
    todo = [{"name": "unpruned", "kind": "none", "dir": None}] + run.masks
    return {entry["name"]: with_per_prompt(run, os.path.join(ev_dir, f"{evaluation_file(entry)}.json"), entry["dir"])
            for entry in todo}


def with_per_prompt(run, unit: str, mask_dir: str | None) -> dict[str, Any]:
    """An evaluation unit's metrics, with the per-answer NLLs the report bootstraps over. A unit
    written before they were kept lacks them: they are measured again (held-out NLLs only, no
    generations) and added to the unit, so an older run directory gains intervals without
    redoing its scans, masks or generations."""
    metrics = read_json(unit)
    if "per_prompt" in metrics:
        return metrics
    cfg = run.cfg
    nll = nll_metrics(run.model, masked_params(run.model, mask_dir), run.examples["held"],
                      run.examples["held_benign"] if "benign_nll" in metrics else None,
                      text_format=cfg.scoring.text_format, max_length=cfg.evaluation.max_length,
                      batch_size=cfg.evaluation.batch_size)
    metrics["per_prompt"] = nll["per_prompt"]
    write_json_atomic(unit, metrics)
    return metrics


def benign_baselines(run, plan: EvaluationPlan, results: dict[str, Any]) -> dict[str, Any] | None:
    """Claim 2's benign \\ retain baselines (`build_baselines`), their metrics added to
    `results`; None when off (or in a config written before they existed)."""
    cfg, model = run.cfg, run.model
    masks_cfg, eval_cfg, baselines_cfg = cfg.masks, cfg.evaluation, cfg.get("baselines")
    headline = headline_mask(run.masks, masks_cfg.headline_q or masks_cfg.category_q)
    if baselines_cfg is None or not baselines_cfg.enabled or headline is None:
        return None
    settings = {"masks": settings_key(run.settings["masks"]), "evaluation": settings_key(plan.settings),
                **baselines_cfg.to_dict()}
    nll_kw = dict(text_format=cfg.scoring.text_format, max_length=eval_cfg.max_length, batch_size=eval_cfg.batch_size)
    gen_kw = dict(max_new_tokens=eval_cfg.max_new_tokens, generation_batch_size=eval_cfg.generation_batch_size,
                  prefixes=plan.prefixes, judge=plan.judge, refusal_min_words=eval_cfg.refusal_min_words)
    base_benign = results["unpruned"]["benign_nll"]

    def evaluate(unit):
        t0 = time.perf_counter()
        metrics = nll_metrics(model, masked_params(model, unit), run.examples["held"], run.examples["held_benign"],
                              **nll_kw)
        return {**metrics, "seconds": time.perf_counter() - t0}

    def generate(unit):
        return generation_metrics(model, masked_params(model, unit), plan.gen_prompts, **gen_kw)

    def baseline_stage(d):
        # Matched to the headline harm mask's benign NLL rise, within the candidates' reach.
        return build_baselines(
            model, run.score_units, d, q0=masks_cfg.category_q,
            q_max=max([*masks_cfg.q_sweep, masks_cfg.category_q, masks_cfg.p]), p=masks_cfg.p,
            granularity=masks_cfg.granularity, seed=cfg.seed,
            target=results[headline["name"]]["benign_nll"] - base_benign, base_benign_nll=base_benign,
            steps=baselines_cfg.match_steps, evaluate=evaluate,
            generate=generate if baselines_cfg.generations and plan.gen_prompts else None,
            category_dirs=[m["dir"] for m in run.masks if m["kind"] == "category"])

    baselines = run.stages.run("baselines", settings, baseline_stage)
    bl_dir = run.stages.path("baselines", settings)
    baselines = {**baselines, "masks": [{**e, "dir": os.path.join(bl_dir, e["dir"])} for e in baselines["masks"]]}
    for e in baselines["masks"]:
        results[e["name"]] = with_per_prompt(run, os.path.join(bl_dir, e["metrics"]), e["dir"])
    return baselines


def over_refusal_masks(run, which: str) -> list[dict[str, Any]]:
    """The mask entries the over-refusal stage measures, the unpruned model first: with "headline"
    the headline harm mask and its random control (same q), with "all" every mask of the masks
    stage."""
    unpruned = {"name": "unpruned", "kind": "none", "dir": None}
    if which == "all":
        return [unpruned, *run.masks]
    if which != "headline":
        raise ValueError(f"over_refusal.masks must be 'headline' or 'all', got {which!r}.")
    masks_cfg = run.cfg.masks
    headline = headline_mask(run.masks, masks_cfg.headline_q or masks_cfg.category_q)
    if headline is None:
        return [unpruned]
    control = [m for m in run.masks if m["kind"] == "random" and m["q"] == headline["q"]]
    return [unpruned, headline, *control[:1]]


def over_refusal(run) -> dict[str, Any] | None:
    """{mask name: over-refusal result} (`harmjax.experiments.core.over_refusal`), one unit per
    mask in its own stage, so switching it on leaves the other stages cached; None when off (or
    in a config written before it existed)."""
    block = run.cfg.get("over_refusal")
    if block is None or not block.enabled:
        return None
    from harmjax.experiments.core.over_refusal import over_refusal_prompts, over_refusal_units

    prompts = over_refusal_prompts(block, run.cfg.seed)
    entries = over_refusal_masks(run, block.masks)
    settings = {"masks": settings_key(run.settings["masks"]), **block.to_dict(), "seed": run.cfg.seed,
                "prompts": examples_digest(prompts, ("id", "kind", "label", "prompt")),
                "measured": [e["name"] for e in entries]}
    named = {e["name"]: (lambda e=e: masked_params(run.model, e["dir"])) for e in entries}

    def stage(d):
        return {"n": len(over_refusal_units(d, named, lambda: run.model, prompts, block))}

    run.stages.run("over_refusal", settings, stage)
    return over_refusal_units(run.stages.path("over_refusal", settings), named, lambda: run.model, prompts, block)


def report(run, plan: EvaluationPlan, results, baselines, t_start: float, over_refusal=None) -> dict[str, Any]:
    """Writes the report (`harmjax.experiments.main.report`); returns its metrics."""
    from harmjax.experiments.main.report import write_report

    p, ex = run.prompts, run.examples
    data = {
        "harmful_prompts": len(p["harmful"]), "pruning_prompts": len(p["prune"]) + len(p["extra"]),
        "heldout_prompts": len(p["held"]), "pruning_examples": len(ex["prune"]), "heldout_examples": len(ex["held"]),
        "retain_examples": len(ex["retain"]), "benign_heldout_examples": len(ex["held_benign"]),
        "generation_prompts": len(plan.gen_prompts), "categories": sorted({e.category for e in p["harmful"]}),
        **run.info["answers"],
    }
    timings = {**run.stages.timings, "load": {"seconds": run.load_seconds}}
    return write_report(
        run.dir, cfg=run.cfg, model=run.model, model_source=run.source, data=data, masks=run.masks, results=results,
        overlap=run.info["masks"]["overlap"], baselines=baselines, over_refusal=over_refusal,
        timings=timings, wall_seconds=time.perf_counter() - t_start,
    )
