"""The comparison's direction and evaluation stages: the refusal direction with its
activation-addition check, then every intervention measured on the held-out prompts (one
JSON unit each, so a killed run keeps the finished ones)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from harmjax.evaluate.refusal import is_refusal
from harmjax.experiments.baselines.measures import INTERVENTIONS
from harmjax.experiments.core.stages import examples_digest, read_json, settings_key, write_json_atomic


def direction_stage(run, d: str, harm_val, benign_val) -> dict[str, Any]:
    """Mean-difference candidates on the pruning (harmful) and retain (benign) prompts, the
    one chosen on the validation prompts (`select_direction`), and activation addition on the
    benign held-out prompts: their refusal rate (refusal phrases) with and without it."""
    from harmjax.direction import addition_edit, generate_with_edit, mean_diff_directions, select_direction
    from harmjax.generate import generate

    cfg, model, p = run.cfg.direction, run.model, run.prompts
    dirs = mean_diff_directions(model, [e.prompt for e in p["prune"]], [e.prompt for e in p["retain"]],
                                n_positions=cfg.positions or None, batch_size=cfg.batch_size)
    sel = select_direction(model, dirs, [e.prompt for e in harm_val], [e.prompt for e in benign_val],
                           batch_size=cfg.batch_size, max_layer_fraction=cfg.max_layer_fraction,
                           layers=range(0, model.config.num_layers, max(1, cfg.layer_stride)))
    prompts = [e.prompt for e in p["held_benign"]]
    gen = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch_size, progress=False)
    plain = list(generate(model, prompts, **gen).texts)
    added = list(generate_with_edit(model, prompts, addition_edit(model.config, sel.vector, sel.layer), **gen).texts)
    flags = [[bool(is_refusal(t, min_words=0)) for t in texts] for texts in (plain, added)]
    write_json_atomic(os.path.join(d, "direction.json"), {"vector": np.asarray(sel.vector).tolist(), "table": sel.table})
    return {"layer": sel.layer, "position": sel.position, "passed_filters": sel.passed_filters,
            "baseline": sel.baseline, "candidates": len(sel.table),
            "chosen": next(r for r in sel.table if r["layer"] == sel.layer and r["position"] == sel.position),
            "addition": {"prompts": len(prompts), "refusal_plain": float(np.mean(flags[0])) if prompts else None,
                         "refusal_added": float(np.mean(flags[1])) if prompts else None,
                         "flags_plain": flags[0], "flags_added": flags[1],
                         "samples": [{"prompt": q, "plain": a, "added": b} for q, a, b in zip(prompts, plain, added)][:6]}}


def _model_and_params(run, name: str):
    """(model, params) of one intervention: masked params, or the orthogonalized model."""
    from harmjax.masks import apply_mask, load_mask

    model = run.model
    if name == "none":
        return model, model.params
    if name == "direction":
        from harmjax.direction import orthogonalized_model

        vec = np.asarray(read_json(os.path.join(run.info["direction_dir"], "direction.json"))["vector"], np.float32)
        ortho = orthogonalized_model(model, vec)
        return ortho, ortho.params
    mask, _ = load_mask(os.path.join(run.info["mask_dir"], name), model.params)
    return model, apply_mask(model.params, mask)


def measure(model, params, run, or_prompts) -> dict[str, Any]:
    """The measures of one intervention on the held-out sets: per-text NLLs of the unmodified
    model's attacked harmful answers and benign answers, plain greedy answers to the harmful
    prompts (refusal), recognition log-odds of harmful and benign prompts, over-refusal."""
    from harmjax.evaluate.over_refusal import measure_over_refusal
    from harmjax.evaluate.recognition import recognition_logodds, recognition_summary
    from harmjax.experiments.core.measure import mean_finite
    from harmjax.experiments.dissociation.measures import per_text_nll
    from harmjax.generate import generate

    cfg, p, ex = run.cfg, run.prompts, run.examples
    e = cfg.evaluation
    out: dict[str, Any] = {"per_prompt": per_text_nll(model, params, ex["held_harm"], ex["held_benign"], [], e,
                                                      cfg.scoring.text_format)}
    out.update({k: mean_finite(out["per_prompt"][k]) for k in ("harm_nll", "benign_nll")})
    prompts = [x.prompt for x in p["held"]]
    plain = list(generate(model, prompts, max_new_tokens=e.max_new_tokens, batch_size=e.generation_batch_size,
                          params=params, progress=False).texts)
    refused = [bool(is_refusal(t, min_words=e.refusal_min_words)) for t in plain]
    out["refusal_rate"] = float(np.mean(refused)) if refused else float("nan")
    out["refusal_rate_phrase"] = float(np.mean([bool(is_refusal(t, min_words=0)) for t in plain])) if plain else float("nan")
    lo_h = recognition_logodds(model, params, prompts, batch_size=e.batch_size)
    lo_b = recognition_logodds(model, params, [x.prompt for x in p["held_benign"]], batch_size=e.batch_size)
    rec = recognition_summary(lo_h, lo_b)
    out.update(recognition_auroc=rec["auroc"], recognition_separation=rec["separation"], recognition=rec,
               benign_recognition_logodds=[float(x) for x in lo_b])
    out["samples"] = [{"id": x.id, "category": x.category, "prompt": x.prompt, "answer": a, "refused": r,
                       "recognition_logodds": float(lo)} for x, a, r, lo in zip(p["held"], plain, refused, lo_h)]
    if or_prompts:
        orb = cfg.over_refusal
        out["over_refusal"] = measure_over_refusal(model, params, or_prompts, max_new_tokens=orb.max_new_tokens,
                                                   batch_size=orb.batch_size)
    return out


def evaluation(run) -> dict[str, Any]:
    """{intervention: `measure`'s metrics} on the held-out prompts, one unit each."""
    from tqdm import tqdm

    from harmjax.experiments.core.over_refusal import over_refusal_prompts

    cfg, p = run.cfg, run.prompts
    orb = cfg.over_refusal
    # Without contrasts: the harmful held-out prompts already show a model that refuses everything.
    or_prompts = [x for x in over_refusal_prompts(orb, cfg.seed) if orb.contrasts or x.label == "safe"] \
        if orb.enabled else []
    settings = {"masks": settings_key(run.settings["masks"]), "direction": settings_key(run.settings["direction"]),
                **cfg.evaluation.to_dict(), "over_refusal": orb.to_dict(), "heldout": examples_digest(p["held"]),
                "benign_heldout": examples_digest(p["held_benign"])}

    def evaluate_stage(d):
        for name in tqdm(INTERVENTIONS, desc="evaluate", unit="intervention", disable=not run.progress):
            unit = os.path.join(d, f"{name}.json")
            if os.path.isfile(unit):
                continue
            t0 = time.perf_counter()
            model, params = _model_and_params(run, name)
            r = measure(model, params, run, or_prompts)
            r["seconds"] = time.perf_counter() - t0
            write_json_atomic(unit, r)
            del params
        return {"interventions": list(INTERVENTIONS)}

    run.stages.run("evaluation", settings, evaluate_stage)
    ev_dir = run.stages.path("evaluation", settings)
    run.info["evaluation_dir"] = ev_dir
    return {name: read_json(os.path.join(ev_dir, f"{name}.json")) for name in INTERVENTIONS}


__all__ = ["direction_stage", "evaluation", "measure"]
