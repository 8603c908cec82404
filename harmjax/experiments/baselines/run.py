"""The baselines comparison, per model, as cached stages:

  model       each of `cfg.models` ("refusal" = the refusal-tuned model of `cfg.refusal`)
  -> prompts  samples of the refusal tuning's split (dissociation's stage: same samples)
  -> answers  the model's own texts (dissociation's stage; served from a dissociation run of
              the same model and settings when one exists, see `ReusingStages`)
  -> scores   signed SNIP (harm) and Wanda on the attacked harmful answers, retain and Wanda
              on benign answers, |W|: per-matrix top candidates
  -> masks    harm = T_q(harm) \\ T_p(retain); wanda, magnitude and random at the harm mask's
              count per matrix (`measures.matched_difference`)
  -> direction  the refusal direction (mean difference on the pruning vs retain prompts,
              chosen on a validation split), and activation addition on benign held-out prompts
  -> evaluation per intervention (`measures.INTERVENTIONS`), on held-out prompts only
  -> report   report.md, metrics.json, baselines.png over all models (`report.py`)

`run_baselines(cfg)` takes configs/baselines_embedded.py.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from harmjax.experiments.core import answers as answers_mod
from harmjax.experiments.core.stages import (
    DONE, StageCache, as_config, default_run_dir, examples_digest, finish_unit, fresh_dir, settings_key, unit_done,
)
from harmjax.experiments.dissociation import run as dissociation
from harmjax.experiments.dissociation.data import check_disjoint, sample


class ReusingStages(StageCache):
    """A StageCache that serves a finished stage from another run's cache when that run
    computed it under the same settings (same key), e.g. the dissociation job's answers."""

    def __init__(self, run_dir: str, reuse: list[str]):
        super().__init__(run_dir)
        self.reuse = [os.path.join(d, "cache") for d in reuse]

    def path(self, name, settings):
        """The own stage directory, or a finished one of the same key in a reused run."""
        own = super().path(name, settings)
        if not os.path.isfile(os.path.join(own, DONE)):
            for root in self.reuse:
                other = os.path.join(root, os.path.basename(own))
                if os.path.isfile(os.path.join(other, DONE)):
                    return other
        return own


@dataclasses.dataclass
class BaselinesRun(dissociation.DissociationRun):
    """One model's run; the dissociation stages it reuses read the same fields."""


def run_baselines(cfg, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) the comparison on every model of `cfg.models`; writes the report
    (report.md, metrics.json, baselines.png) in the output directory; returns its metrics."""
    from harmjax.experiments.baselines.report import write_baselines_report

    cfg = as_config(cfg)
    t_start = time.perf_counter()
    out_dir = cfg.output_dir or os.path.join("runs", "baselines")
    per_model = {}
    for label, name in zip(cfg.labels, cfg.models):
        per_model[label] = run_model(cfg, name, os.path.join(out_dir, label), progress)
    return write_baselines_report(out_dir, cfg, per_model, time.perf_counter() - t_start)


def run_model(cfg, name: str, run_dir: str, progress: bool) -> dict[str, Any]:
    """Every stage for one model; {source, data, sizes, direction, results, timings}."""
    from harmjax.experiments.core.model_sources import load_model
    from harmjax.experiments.refusal.source import resolve_source

    source = resolve_source(name, cfg.refusal, progress=progress)
    stages = ReusingStages(run_dir, [cfg.reuse_dir or default_run_dir(source, "dissociation")])
    model, load_seconds, model_id = load_model(cfg, source)
    run = BaselinesRun(cfg, source, model, model_id, stages, progress, load_seconds)
    dissociation.prompt_samples(run)
    dissociation.answers(run)
    # The evaluation's share of the held-out samples (the answers stage keeps dissociation's).
    e = cfg.evaluation
    run.prompts.update(held=per_category(run.prompts["held"], e.heldout_per_category),
                       held_benign=per_category(run.prompts["held_benign"], e.benign_heldout_per_category))
    examples(run)
    scores(run)
    masks(run)
    direction(run)
    from harmjax.experiments.baselines.evaluation import evaluation

    results = evaluation(run)
    p, ex = run.prompts, run.examples
    data = {"pruning_prompts": len(p["prune"]), "heldout_prompts": len(p["held"]), "retain_prompts": len(p["retain"]),
            "benign_heldout_prompts": len(p["held_benign"]), "harm_examples": len(ex["harm"]),
            "retain_examples": len(ex["retain"]), "heldout_harm_answers": len(ex["held_harm"]),
            "benign_heldout_answers": len(ex["held_benign"])}
    return {"source": source, "data": data, "sizes": run.info["masks"]["sizes"], "direction": run.info["direction"],
            "results": results, "timings": {**stages.timings, "load": {"seconds": load_seconds}}, "dir": run_dir,
            "mask_dir": run.info["mask_dir"], "evaluation_dir": run.info["evaluation_dir"]}


def per_category(examples, k: int) -> list:
    """The first `k` examples of each category, in order (all with 0)."""
    seen: dict[str, int] = {}
    out = []
    for e in examples:
        seen[e.category] = seen.get(e.category, 0) + 1
        if not k or seen[e.category] <= k:
            out.append(e)
    return out


def examples(run: BaselinesRun) -> None:
    """The scoring sets (harm: attacked harmful answers, refusals dropped; retain: benign
    answers) and the held-out texts measured per intervention."""
    ans_dir = run.stages.path("answers", run.settings["answers"])
    prune, held, retain, held_b = (run.prompts[k] for k in ("prune", "held", "retain", "held_benign"))

    def rows(name):
        return {r["id"]: r for r in answers_mod.read_rows(os.path.join(ans_dir, name))}

    att, ben = rows("harmful_attacked.jsonl"), rows("benign.jsonl")
    run.examples.update(
        harm=answers_mod.as_examples([att[e.id] for e in prune]),
        retain=answers_mod.as_examples([ben[e.id] for e in retain], drop_refused=False),
        held_harm=answers_mod.as_examples([att[e.id] for e in held]),
        held_benign=answers_mod.as_examples([ben[e.id] for e in held_b], drop_refused=False))
    check_disjoint(run.examples["harm"] + run.examples["retain"], held + held_b)
    if not run.examples["harm"] or not run.examples["retain"]:
        raise ValueError(f"Nothing to score: {len(run.examples['harm'])} attacked harmful answers, "
                         f"{len(run.examples['retain'])} benign answers (sample more pruning prompts).")


def scores(run: BaselinesRun) -> None:
    """Score candidates: harm + wanda_harm (one pass over the harmful answers), retain +
    wanda_benign (one pass over the benign answers), magnitude (no pass). q + p candidates per
    matrix, so a count-matched difference never runs out (`measures.matched_difference`)."""
    from harmjax.experiments.core.scoring import scan_kwargs, scan_to_units, score_settings

    cfg, ex = run.cfg, run.examples
    top = float(cfg.masks.q + cfg.masks.p)
    retain_kind = cfg.scoring.retain_kind
    settings = {"answers": settings_key(run.settings["answers"]), **score_settings(cfg.scoring), "top_fraction": top,
                "harm": examples_digest(ex["harm"]), "retain": examples_digest(ex["retain"])}
    kw = scan_kwargs(cfg.scoring, run.progress)
    summary = {"model": run.source, "seed": cfg.seed, "text_format": cfg.scoring.text_format}
    passes = (("harm", ex["harm"], {"harm": "harm", "wanda": "wanda_harm"}),
              ("retain", ex["retain"], {retain_kind: "retain", "wanda": "wanda_benign"}),
              ("magnitude", ex["harm"], {"magnitude": "magnitude"}))

    def score_stage(d):
        for data, examples_, names in passes:
            if not all(unit_done(os.path.join(d, u)) for u in names.values()):
                kind = tuple(names) if len(names) > 1 else next(iter(names))
                scan_to_units(run.model, examples_, kind, os.path.join(d, names[next(iter(names))]), kw,
                              {**summary, "data": data, "nsamples": len(examples_)},
                              names={k: os.path.join(d, u) for k, u in names.items()}, top_fraction=top)
        return {"units": [u for _, _, names in passes for u in names.values()]}

    info = run.stages.run("scores", settings, score_stage)
    run.settings["scores"] = settings
    sc_dir = run.stages.path("scores", settings)
    run.info["score_units"] = {u: os.path.join(sc_dir, u) for u in info["units"]}


def masks(run: BaselinesRun) -> None:
    """harm = T_q(harm) \\ T_p(retain); wanda, magnitude, random matched to its count per matrix."""
    from harmjax.experiments.baselines.measures import MASKED, matched_difference
    from harmjax.masks import load_candidates, random_indices, read_summary, save_mask_indices, select_indices

    cfg, q, p = run.cfg, run.cfg.masks.q, run.cfg.masks.p
    settings = {"scores": settings_key(run.settings["scores"]), "q": q, "p": p, "seed": cfg.seed}

    def mask_stage(d):
        c = {k: load_candidates(v)[0] for k, v in run.info["score_units"].items()}
        shapes = load_candidates(run.info["score_units"]["harm"])[1]
        harm = select_indices(c["harm"], c["retain"], shapes, q, p)
        counts = {n: len(v) for n, v in harm.items()}
        built = {"harm": harm, "wanda": matched_difference(c["wanda_harm"], c["wanda_benign"], shapes, counts, p),
                 "magnitude": matched_difference(c["magnitude"], c["retain"], shapes, counts, p),
                 "random": random_indices(counts, shapes, cfg.seed)}
        for name in MASKED:
            unit = os.path.join(d, name)
            if not unit_done(unit):
                tmp = fresh_dir(unit)
                save_mask_indices(tmp, built[name], shapes, {"name": name, "q": q, "p": p, "seed": cfg.seed,
                                                             "matched_to": None if name == "harm" else "harm"},
                                  num_params=run.model.num_params())
                finish_unit(tmp, unit, {"name": name})
        return {"sizes": {n: {"total": read_summary(os.path.join(d, n))["counts"]["total"],
                              "fraction": read_summary(os.path.join(d, n))["fraction_pruned"]} for n in MASKED}}

    run.info["masks"] = run.stages.run("masks", settings, mask_stage)
    run.settings["masks"] = settings
    run.info["mask_dir"] = run.stages.path("masks", settings)


def validation_prompts(run: BaselinesRun) -> tuple[list, list]:
    """Harmful and benign validation prompts for choosing the direction: samples of the
    refusal tuning's training split outside the pruning and retain samples (never held out)."""
    from harmjax.experiments.refusal.data import split_prompts

    split = split_prompts(as_config(run.cfg.refusal))
    used = {e.id for e in run.prompts["prune"] + run.prompts["retain"]}
    n, seed = run.cfg.direction.val_per_category, run.cfg.seed + 1
    harm = sample([e for e in split.train if e.id not in used], n, seed)
    benign = sample([e for e in split.benign_train if e.id not in used], n, seed)
    check_disjoint(harm + benign, run.prompts["held"] + run.prompts["held_benign"])
    if not harm or not benign:
        raise ValueError(f"No validation prompts left for the refusal direction ({len(harm)} harmful, {len(benign)} "
                         "benign): sample fewer pruning or retain prompts.")
    return harm, benign


def direction(run: BaselinesRun) -> None:
    """The refusal direction and the activation-addition check, in direction.json."""
    from harmjax.experiments.baselines.evaluation import direction_stage

    harm_val, benign_val = validation_prompts(run)
    p = run.prompts
    settings = {"model": run.model_id, "train_harmful": examples_digest(p["prune"]),
                "train_benign": examples_digest(p["retain"]), "val_harmful": examples_digest(harm_val),
                "val_benign": examples_digest(benign_val), "benign_heldout": examples_digest(p["held_benign"]),
                **run.cfg.direction.to_dict()}
    run.info["direction"] = run.stages.run("direction", settings,
                                           lambda d: direction_stage(run, d, harm_val, benign_val))
    run.settings["direction"] = settings
    run.info["direction_dir"] = run.stages.path("direction", settings)


__all__ = ["ReusingStages", "run_baselines", "run_model"]
