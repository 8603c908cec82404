"""Dissociation (Orgad et al. claim 5, issue 13 part 3), as cached stages:

  model     the refusal-tuned model (`harmjax.experiments.refusal.run.ensure_refusal_model`), or `cfg.model` as given
  -> answers   the unmasked model's own texts, generated once: harmful answers under the
               prefilling attack (pruning + held-out prompts), plain answers to the pruning
               prompts (its refusals), benign answers, explanations of why held-out requests
               are harmful
  -> scores    signed SNIP on the attacked harmful answers (harm), on the refusals (refusal),
               and the retain score on benign answers
  -> masks     harm = T_q(harm) \\ T_p(retain), refusal = T_q(refusal) \\ T_p(retain), and a
               random control of the same size per matrix for each
  -> evaluation  per mask, on held-out prompts only: recognition (yes/no log-odds, AUROC),
               refusal rate without attack (keyword rule), explanation NLL, harmful
               generation under the prefilling attack (held-out harmful-answer NLL and the
               keyword non-refusal rate of prefilled continuations), benign NLL
  -> report    report.md, metrics.json, dissociation.png: the 2 x 2 table (mask x behaviour)
               and the verdict of `verdict()`.

Prompts come from the refusal tuning's split (configs/refusal_embedded.py): pruning prompts
from its training split, held-out prompts from its held-out split; the code checks that no
held-out prompt is scored. `run_dissociation(cfg)` takes configs/dissociation_embedded.py.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from harmjax.data.records import Example
from harmjax.experiments.core import answers as answers_mod
from harmjax.experiments.core.stages import (
    ExperimentRun, StageCache, as_config, default_run_dir, examples_digest, finish_unit, fresh_dir, read_json, settings_key,
    unit_done, write_json_atomic,
)
from harmjax.experiments.dissociation.data import check_disjoint, prefilled_answers, sample
from harmjax.experiments.dissociation.measures import (
    CONTROL, MASKS, deltas, measure_dissociation, per_text_nll, verdict,
)
from harmjax.experiments.dissociation.report import write_dissociation_report


@dataclasses.dataclass
class DissociationRun(ExperimentRun):
    """One dissociation run: its config, model and stage cache, and what each stage leaves for
    the ones after it (prompt samples, examples, stage settings and infos)."""

    prompts: dict[str, list] = dataclasses.field(default_factory=dict)
    examples: dict[str, list] = dataclasses.field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def _model_source(cfg, progress: bool) -> str:
    # "" (the default) is the refusal-tuned model of cfg.refusal, as model="refusal" elsewhere.
    from harmjax.experiments.refusal.source import REFUSAL, resolve_source

    return resolve_source(cfg.model or REFUSAL, cfg.refusal, progress=progress)


def run_dissociation(cfg, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) the dissociation job and writes its report; returns its metrics."""
    from harmjax.experiments.core.model_sources import load_model

    cfg = as_config(cfg)
    t_start = time.perf_counter()
    source = _model_source(cfg, progress)
    run_dir = cfg.output_dir or default_run_dir(source, "dissociation")
    os.makedirs(run_dir, exist_ok=True)
    stages = StageCache(run_dir)
    model, load_seconds, model_id = load_model(cfg, source)
    run = DissociationRun(cfg, source, model, model_id, stages, progress, load_seconds)
    prompt_samples(run)
    answers(run)
    examples(run)
    scores(run)
    masks(run)
    results = evaluation(run)
    return report(run, results, t_start)


def prompt_samples(run: DissociationRun) -> None:
    """Samples of the refusal tuning's split; their ids written to prompts.json."""
    from harmjax.experiments.refusal.data import split_prompts

    prompts_cfg, seed = run.cfg.prompts, run.cfg.seed
    split = split_prompts(as_config(run.cfg.refusal))
    prune = sample(split.train, prompts_cfg.pruning_per_category, seed)
    held = sample(split.heldout, prompts_cfg.heldout_per_category, seed)
    retain = sample(split.benign_train, prompts_cfg.retain_per_category, seed)
    held_b = sample(split.benign_heldout, prompts_cfg.benign_heldout_per_category, seed)
    check_disjoint(prune + retain, held + held_b)
    write_json_atomic(os.path.join(run.dir, "prompts.json"), {
        "pruning": [e.id for e in prune], "heldout": [e.id for e in held], "retain": [e.id for e in retain],
        "benign_heldout": [e.id for e in held_b]})
    run.prompts.update(prune=prune, held=held, retain=retain, held_benign=held_b)


def answers(run: DissociationRun) -> None:
    """The unmasked model's texts: attacked harmful answers, plain answers (its refusals),
    benign answers, explanations."""
    answers_cfg, model, p = run.cfg.answers, run.model, run.prompts
    prune, held, retain, held_b = p["prune"], p["held"], p["retain"], p["held_benign"]
    settings = {"model": run.model_id, "pruning": examples_digest(prune), "heldout": examples_digest(held),
                "retain": examples_digest(retain), "benign_heldout": examples_digest(held_b), **answers_cfg.to_dict()}

    def answer_stage(d):
        gen = dict(max_new_tokens=answers_cfg.max_new_tokens, batch_size=answers_cfg.batch_size,
                   chunk=answers_cfg.chunk)
        att = prefilled_answers(model, prune + held, os.path.join(d, "harmful_attacked.jsonl"),
                                prefix=answers_cfg.attack_prefix, min_words=answers_cfg.harmful_min_words, **gen)
        plain = answers_mod.generate_answers(model, prune, os.path.join(d, "harmful_plain.jsonl"),
                                             attack_refusals=False, min_words=answers_cfg.refusal_min_words,
                                             desc="plain answers", **gen)
        ben = answers_mod.generate_answers(model, retain + held_b, os.path.join(d, "benign.jsonl"),
                                           attack_refusals=False, desc="benign answers", **gen)
        exp = prefilled_answers(model, held, os.path.join(d, "explanations.jsonl"),
                                prefix=answers_cfg.explanation_prefix, max_new_tokens=answers_cfg.explanation_tokens,
                                batch_size=answers_cfg.batch_size, chunk=answers_cfg.chunk, min_words=0,
                                question=answers_cfg.explanation_question)
        return {"attacked": len(att), "attacked_refused": sum(r["refused"] for r in att),
                "plain": len(plain), "plain_refusals": sum(r["refused"] for r in plain), "benign": len(ben),
                "explanations": len(exp)}

    run.info["answers"] = run.stages.run("answers", settings, answer_stage)
    run.settings["answers"] = settings


def examples(run: DissociationRun) -> None:
    """The scoring sets (harm, refusal, retain) and the held-out texts measured per mask."""
    ans_dir = run.stages.path("answers", run.settings["answers"])
    prune, held, retain, held_b = (run.prompts[k] for k in ("prune", "held", "retain", "held_benign"))

    def rows(name):
        return {r["id"]: r for r in answers_mod.read_rows(os.path.join(ans_dir, name))}

    att_rows, plain_rows, ben_rows, exp_rows = (rows(n) for n in (
        "harmful_attacked.jsonl", "harmful_plain.jsonl", "benign.jsonl", "explanations.jsonl"))
    ex_harm = answers_mod.as_examples([att_rows[e.id] for e in prune])  # still-refused answers dropped
    # The model's refusals: plain answers its keyword rule (answers.refusal_min_words) calls refusals.
    ex_refusal = [Example(prompt=r["prompt"], response=r["response"], category=r["category"], id=r["id"])
                  for r in (plain_rows[e.id] for e in prune) if r["refused"] and r["response"].strip()]
    ex_retain = answers_mod.as_examples([ben_rows[e.id] for e in retain], drop_refused=False)
    question = run.cfg.answers.explanation_question
    run.examples.update(
        harm=ex_harm, refusal=ex_refusal, retain=ex_retain,
        held_harm=answers_mod.as_examples([att_rows[e.id] for e in held]),
        held_benign=answers_mod.as_examples([ben_rows[e.id] for e in held_b], drop_refused=False),
        explanations=[Example(prompt=question.format(prompt=exp_rows[e.id]["prompt"]),
                              response=exp_rows[e.id]["response"], category=e.category, id=e.id) for e in held])
    check_disjoint(ex_harm + ex_refusal + ex_retain, held + held_b)
    if not ex_harm or not ex_refusal or not ex_retain:
        raise ValueError(f"Nothing to score: {len(ex_harm)} attacked harmful answers, {len(ex_refusal)} refusals, "
                         f"{len(ex_retain)} benign answers (sample more pruning prompts).")


def scores(run: DissociationRun) -> None:
    """Signed SNIP on the attacked harmful answers and on the refusals, the retain score."""
    from harmjax.experiments.core.scoring import scan_kwargs, scan_to_units, score_settings

    cfg, ex = run.cfg, run.examples
    scoring_cfg, masks_cfg = cfg.scoring, cfg.masks
    top_fraction = (None if scoring_cfg.keep_dense_scores or masks_cfg.granularity != "matrix"
                    else float(max(masks_cfg.q, masks_cfg.p)))
    scan_kw = scan_kwargs(scoring_cfg, run.progress)
    settings = {"answers": settings_key(run.settings["answers"]), **score_settings(scoring_cfg),
                "top_fraction": top_fraction, "harm": examples_digest(ex["harm"]),
                "refusal": examples_digest(ex["refusal"]), "retain": examples_digest(ex["retain"])}
    summary = {"model": run.source, "seed": cfg.seed, "text_format": scoring_cfg.text_format}

    def score_stage(d):
        for key, examples_, kind in (("harm", ex["harm"], "harm"), ("refusal", ex["refusal"], "harm"),
                                     ("retain", ex["retain"], scoring_cfg.retain_kind)):
            unit = os.path.join(d, key)
            if not unit_done(unit):
                scan_to_units(run.model, examples_, kind, unit, scan_kw,
                              {**summary, "data": key, "nsamples": len(examples_)}, top_fraction=top_fraction)
        return {"units": ["harm", "refusal", "retain"], "examples": {"harm": len(ex["harm"]),
                                                                     "refusal": len(ex["refusal"]),
                                                                     "retain": len(ex["retain"])}}

    info = run.stages.run("scores", settings, score_stage)
    run.settings["scores"] = settings
    sc_dir = run.stages.path("scores", settings)
    run.info["score_units"] = {k: os.path.join(sc_dir, k) for k in info["units"]}


def masks(run: DissociationRun) -> None:
    """harm and refusal masks T_q \\ T_p(retain), each with a random control of its size per matrix."""
    cfg, model, masks_cfg = run.cfg, run.model, run.cfg.masks
    settings = {"scores": settings_key(run.settings["scores"]), **masks_cfg.to_dict(), "seed": cfg.seed}

    def mask_stage(d):
        from harmjax.experiments.core.selection import select_from_units
        from harmjax.masks import load_mask, random_like, save_mask
        from harmjax.masks.storage import read_summary
        from harmjax.sharding import param_shardings

        shardings = param_shardings(model.config, model.mesh)
        common = {"q": masks_cfg.q, "p": masks_cfg.p, "granularity": masks_cfg.granularity, "seed": cfg.seed}
        for i, key in enumerate(("harm", "refusal")):
            unit = os.path.join(d, key)
            mask = None
            if not unit_done(unit):
                mask = select_from_units(run.info["score_units"], key, masks_cfg.q, masks_cfg.p,
                                         masks_cfg.granularity, shardings)
                tmp = fresh_dir(unit)
                save_mask(tmp, mask, {"name": key, "mask_kind": key, **common}, num_params=model.num_params())
                finish_unit(tmp, unit, {"name": key})
            control = os.path.join(d, CONTROL[key])
            if not unit_done(control):
                if mask is None:
                    mask, _ = load_mask(unit, model.params)
                tmp = fresh_dir(control)
                save_mask(tmp, random_like(mask, cfg.seed + i),
                          {"name": CONTROL[key], "mask_kind": "random", "matched_to": key, **common},
                          num_params=model.num_params())
                finish_unit(tmp, control, {"name": CONTROL[key]})
        sizes = {}
        for name in MASKS[1:]:
            s = read_summary(os.path.join(d, name))
            sizes[name] = {"total": s["counts"]["total"], "fraction": s["fraction_pruned"]}
        return {"sizes": sizes}

    run.info["masks"] = run.stages.run("masks", settings, mask_stage)
    run.settings["masks"] = settings


def evaluation(run: DissociationRun) -> dict[str, Any]:
    """`measure_dissociation` of the unmasked model and of every mask: {mask name: metrics}."""
    cfg, model, eval_cfg = run.cfg, run.model, run.cfg.evaluation
    p, ex = run.prompts, run.examples
    mk_dir = run.stages.path("masks", run.settings["masks"])
    settings = {"masks": settings_key(run.settings["masks"]), **eval_cfg.to_dict(),
                "heldout": examples_digest(p["held"]), "benign_heldout": examples_digest(p["held_benign"])}

    def evaluate_stage(d):
        from tqdm import tqdm

        from harmjax.masks import apply_mask, load_mask

        for name in tqdm(MASKS, desc="evaluate masks", unit="mask", disable=not run.progress):
            unit = os.path.join(d, f"{name}.json")
            if os.path.isfile(unit):
                continue
            params = model.params
            if name != "none":
                mask, _ = load_mask(os.path.join(mk_dir, name), model.params)
                params = apply_mask(model.params, mask)
            t0 = time.perf_counter()
            r = measure_dissociation(model, params, heldout=p["held"], benign_heldout=p["held_benign"],
                                     harm_answers=ex["held_harm"], benign_answers=ex["held_benign"],
                                     explanations=ex["explanations"], eval_cfg=eval_cfg,
                                     text_format=cfg.scoring.text_format)
            r["seconds"] = time.perf_counter() - t0
            write_json_atomic(unit, r)
            del params
        return {"masks": list(MASKS)}

    run.stages.run("evaluation", settings, evaluate_stage)
    ev_dir = run.stages.path("evaluation", settings)
    return {name: _with_per_text(run, os.path.join(ev_dir, f"{name}.json"), mk_dir, name) for name in MASKS}


def _with_per_text(run: DissociationRun, unit: str, mk_dir: str, name: str) -> dict[str, Any]:
    """A unit's metrics with its per-text NLLs; a unit from before they were kept gets them
    measured again (NLLs only: no generations) and written back, for the report's intervals."""
    r = read_json(unit)
    if "per_prompt" in r:
        return r
    from harmjax.masks import apply_mask, load_mask

    model, ex = run.model, run.examples
    params = model.params if name == "none" else apply_mask(model.params, load_mask(os.path.join(mk_dir, name),
                                                                                    model.params)[0])
    r["per_prompt"] = per_text_nll(model, params, ex["held_harm"], ex["held_benign"], ex["explanations"],
                                   run.cfg.evaluation, run.cfg.scoring.text_format)
    write_json_atomic(unit, r)
    return r


def report(run: DissociationRun, results: dict[str, Any], t_start: float) -> dict[str, Any]:
    """Writes the report; returns its metrics."""
    p, ex = run.prompts, run.examples
    data = {"pruning_prompts": len(p["prune"]), "heldout_prompts": len(p["held"]), "retain_prompts": len(p["retain"]),
            "benign_heldout_prompts": len(p["held_benign"]), "harm_examples": len(ex["harm"]),
            "refusal_examples": len(ex["refusal"]), "retain_examples": len(ex["retain"]),
            "heldout_harm_answers": len(ex["held_harm"]), "benign_heldout_answers": len(ex["held_benign"]),
            "explanations": len(ex["explanations"]), **run.info["answers"]}
    timings = {**run.stages.timings, "load": {"seconds": run.load_seconds}}
    return write_dissociation_report(run.dir, cfg=run.cfg, source=run.source, data=data,
                                     sizes=run.info["masks"]["sizes"], results=results, timings=timings,
                                     wall_seconds=time.perf_counter() - t_start)


__all__ = ["MASKS", "deltas", "measure_dissociation", "prefilled_answers", "run_dissociation", "verdict",
           "write_dissociation_report"]
