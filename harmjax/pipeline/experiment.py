"""The paper's experiment end to end, as cached stages (see `harmjax.pipeline.stages`):

  prompts  -> answers  -> scores  -> masks  -> evaluation  -> baselines  -> report
  (split)     (greedy,     (harm per   (q sweep,  (per mask:   (benign \\     (report.md,
              refusals     category,   random,    NLLs,        retain at      metrics.json,
              attacked)    retain +    category,  refusals,    category_q     plots,
                           benign)     benign)    samples)     and matched)   summary)

`run_experiment(cfg)` takes the settings of `configs/embedded.py` (an ml_collections
ConfigDict, or a nested dict with the same fields) and returns the metrics dict it writes.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from tqdm import tqdm

from harmjax.pipeline import answers as answers_mod
from harmjax.pipeline.baselines import build_baselines
from harmjax.pipeline.mask_sweep import build_masks, mask_overlap
from harmjax.pipeline.measure import generation_metrics, measure, nll_metrics
from harmjax.pipeline.prompt_sets import (
    load_benign_prompts, load_harmful_prompts, load_pruning_prompts, split_per_category,
)
from harmjax.pipeline.report import headline_mask
from harmjax.pipeline.scoring import (
    benign_scores, check_score_disk, experiment_score_units, harm_scores_per_category, score_settings,
)
from harmjax.pipeline.stages import (
    StageCache, as_config, default_run_dir, read_json, settings_key, write_json_atomic,
)


def _digest(examples) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.id}\x00{e.category}\x00{e.prompt}\x01".encode())
    return h.hexdigest()[:16]


def run_experiment(cfg, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) the whole experiment and writes the report; returns its metrics."""
    from harmjax.assets import resolve_model_source
    from harmjax.pipeline.model_sources import load_model

    cfg = as_config(cfg)
    t_start = time.perf_counter()
    source = resolve_model_source(cfg.model)
    run_dir = cfg.output_dir or default_run_dir(source)
    os.makedirs(run_dir, exist_ok=True)
    stages = StageCache(run_dir)

    model, load_seconds, model_id = load_model(cfg, source)

    # --- prompts -------------------------------------------------------------------------
    P = cfg.prompts
    harmful = load_harmful_prompts(P.harmful, P.prompt_key, P.category_key)
    prune_h, held_h = split_per_category(harmful, P.per_category, P.heldout_fraction, cfg.seed)
    extra = load_pruning_prompts(P.pruning_extra, P.pruning_extra_key, P.pruning_extra_limit, cfg.seed) \
        if P.pruning_extra else []
    benign = load_benign_prompts(P.benign, P.benign_prompt_key)
    retain_b, held_b = split_per_category(benign, P.benign_per_category, P.benign_heldout_fraction, cfg.seed)
    write_json_atomic(os.path.join(run_dir, "prompts.json"), {
        "pruning": [e.id for e in prune_h + extra], "heldout": [e.id for e in held_h],
        "retain": [e.id for e in retain_b], "benign_heldout": [e.id for e in held_b],
    })

    # --- answers -------------------------------------------------------------------------
    A = cfg.answers
    harmful_all, benign_all = prune_h + held_h + extra, retain_b + held_b
    ans_settings = {"model": model_id, "harmful": _digest(harmful_all), "benign": _digest(benign_all),
                    **A.to_dict()}

    def answer_stage(d):
        kw = dict(max_new_tokens=A.max_new_tokens, batch_size=A.batch_size, chat=A.chat, system=A.system,
                  chunk=A.chunk, min_words=A.min_words)
        h = answers_mod.generate_answers(model, harmful_all, os.path.join(d, "harmful.jsonl"),
                                         attack_prefix=A.attack_prefix, desc="harmful answers", **kw)
        b = answers_mod.generate_answers(model, benign_all, os.path.join(d, "benign.jsonl"),
                                         attack_refusals=False, desc="benign answers", **kw)
        return {"harmful": len(h), "benign": len(b),
                "harmful_attacked": sum(r["attacked"] for r in h),
                "harmful_refused_dropped": sum(r["refused"] for r in h),
                "benign_refused": sum(r["refused"] for r in b)}

    ans_info = stages.run("answers", ans_settings, answer_stage)
    ans_dir = stages.path("answers", ans_settings)
    rows_h = {r["id"]: r for r in answers_mod.read_rows(os.path.join(ans_dir, "harmful.jsonl"))}
    rows_b = {r["id"]: r for r in answers_mod.read_rows(os.path.join(ans_dir, "benign.jsonl"))}

    def examples(ids_from, rows, drop_refused=True):
        return answers_mod.as_examples([rows[e.id] for e in ids_from], drop_refused=drop_refused)

    ex_prune = examples(prune_h + extra, rows_h)
    ex_held = examples(held_h, rows_h)
    ex_retain = examples(retain_b, rows_b, drop_refused=False)
    ex_held_b = examples(held_b, rows_b, drop_refused=False)

    # --- scores --------------------------------------------------------------------------
    S = cfg.scoring
    scan_kw = dict(batch_size=S.batch_size, text_format=S.text_format, max_length=S.max_length,
                   num_buckets=S.num_buckets, remat=S.remat, layerwise=S.layerwise, abs_chunk=S.abs_chunk,
                   checkpoint_every=S.checkpoint_every, progress=progress)
    M = cfg.masks
    top_fraction = candidate_fraction(cfg)
    # "harm_all": how the pruning set's score is made (since 2026-11-30 one scan over it, not the
    # sum of the category trees), so runs scored the old way rescore once.
    sc_settings = {"answers": settings_key(ans_settings), **score_settings(S), "top_fraction": top_fraction,
                   "harm_all": "scan"}
    summary = {"model": source, "seed": cfg.seed, "text_format": S.text_format}

    def score_stage(d):
        # A two-kind retain pass checkpoints two trees at once (dense mode only).
        check_score_disk(model, d, experiment_score_units(ex_prune), checkpoint_trees=2, top_fraction=top_fraction)
        harm_units = harm_scores_per_category(model, ex_prune, d, scan_kw, summary, top_fraction=top_fraction)
        ben_units = benign_scores(model, ex_retain, d, S.retain_kind, scan_kw, summary, top_fraction=top_fraction,
                                  separate_passes=S.separate_retain_passes)
        return {"units": {k: os.path.basename(v) for k, v in {**harm_units, **ben_units}.items()}}

    sc_info = stages.run("scores", sc_settings, score_stage)
    sc_dir = stages.path("scores", sc_settings)
    score_units = {k: os.path.join(sc_dir, v) for k, v in sc_info["units"].items()}

    # --- masks ---------------------------------------------------------------------------
    mk_settings = {"scores": settings_key(sc_settings), **M.to_dict(), "seed": cfg.seed}

    def mask_stage(d):
        entries = build_masks(model, score_units, d, q_sweep=list(M.q_sweep), p=M.p, category_q=M.category_q,
                              granularity=M.granularity, seed=cfg.seed, random_control=M.random_control,
                              dense_copy=M.dense_copy, progress=progress)
        overlap = mask_overlap(model, entries)
        for e in entries:
            e["dir"] = os.path.basename(e["dir"])
        return {"masks": entries, "overlap": overlap}

    mk_info = stages.run("masks", mk_settings, mask_stage)
    mk_dir = stages.path("masks", mk_settings)
    masks = [{**e, "dir": os.path.join(mk_dir, e["dir"])} for e in mk_info["masks"]]

    # --- evaluation ----------------------------------------------------------------------
    E = cfg.evaluation
    gen_prompts = _generation_subset(held_h, rows_h, E.generation_prompts)
    prefixes = None
    if E.prefill_tokens:
        from harmjax.generate.prompts import response_prefix

        prefixes = [response_prefix(model.tokenizer, rows_h[e.id]["response"], E.prefill_tokens) for e in gen_prompts]
    ev_settings = {"masks": settings_key(mk_settings), **E.to_dict(), "judge": cfg.judge.to_dict(),
                   "utility": cfg.utility.to_dict()}
    judge = _judge(cfg.judge, model)
    utility = _utility(cfg.utility, model)

    def evaluate_stage(d):
        todo = [{"name": "unpruned", "kind": "none", "dir": None}] + masks
        results = {}
        for entry in tqdm(todo, desc="evaluate masks", unit="mask", disable=not progress):
            unit = os.path.join(d, f"{_file_name(entry)}.json")
            if os.path.isfile(unit):
                results[entry["name"]] = read_json(unit)
                continue
            kind = entry["kind"]
            params = _masked_params(model, entry["dir"])
            full = kind in ("none", "harm", "random")
            generate = kind in ("none", "harm") or (kind == "random" and E.random_generations)
            t0 = time.perf_counter()
            metrics = measure(
                model, params, ex_held, ex_held_b if (full or kind == "benign" or E.category_benign) else None,
                gen_prompts if generate and E.generation_prompts else None,
                text_format=S.text_format, max_length=E.max_length, batch_size=E.batch_size,
                max_new_tokens=E.max_new_tokens, generation_batch_size=E.generation_batch_size,
                prefixes=prefixes, judge=judge if generate else None,
                utility=utility if kind in ("none", "harm") else None,
                refusal_min_words=E.refusal_min_words,
            )
            metrics["seconds"] = time.perf_counter() - t0
            write_json_atomic(unit, metrics)
            results[entry["name"]] = metrics
            del params
        return {"n": len(results)}

    stages.run("evaluation", ev_settings, evaluate_stage)
    ev_dir = stages.path("evaluation", ev_settings)
    results = {}
    for entry in [{"name": "unpruned", "kind": "none"}] + masks:
        results[entry["name"]] = read_json(os.path.join(ev_dir, f"{_file_name(entry)}.json"))

    # --- benign baselines (claim 2) -------------------------------------------------------
    baselines = None
    B = cfg.get("baselines")  # None in a config written before the baselines existed
    headline = headline_mask(masks, M.headline_q or M.category_q)
    if B is not None and B.enabled and headline is not None:
        bl_settings = {"masks": settings_key(mk_settings), "evaluation": settings_key(ev_settings), **B.to_dict()}
        nll_kw = dict(text_format=S.text_format, max_length=E.max_length, batch_size=E.batch_size)
        gen_kw = dict(max_new_tokens=E.max_new_tokens, generation_batch_size=E.generation_batch_size,
                      prefixes=prefixes, judge=judge, refusal_min_words=E.refusal_min_words)
        base_benign = results["unpruned"]["benign_nll"]

        def evaluate(unit):
            t0 = time.perf_counter()
            metrics = nll_metrics(model, _masked_params(model, unit), ex_held, ex_held_b, **nll_kw)
            return {**metrics, "seconds": time.perf_counter() - t0}

        def generate(unit):
            return generation_metrics(model, _masked_params(model, unit), gen_prompts, **gen_kw)

        def baseline_stage(d):
            # Matched to the headline harm mask's benign NLL rise, within the candidates' reach.
            return build_baselines(
                model, score_units, d, q0=M.category_q, q_max=max([*M.q_sweep, M.category_q, M.p]), p=M.p,
                granularity=M.granularity, seed=cfg.seed,
                target=results[headline["name"]]["benign_nll"] - base_benign, base_benign_nll=base_benign,
                steps=B.match_steps, evaluate=evaluate,
                generate=generate if B.generations and gen_prompts else None,
                category_dirs=[m["dir"] for m in masks if m["kind"] == "category"])

        baselines = stages.run("baselines", bl_settings, baseline_stage)
        bl_dir = stages.path("baselines", bl_settings)
        baselines = {**baselines, "masks": [{**e, "dir": os.path.join(bl_dir, e["dir"])} for e in baselines["masks"]]}
        for e in baselines["masks"]:
            results[e["name"]] = read_json(os.path.join(bl_dir, e["metrics"]))

    # --- report --------------------------------------------------------------------------
    from harmjax.pipeline.report import write_report

    data = {
        "harmful_prompts": len(harmful), "pruning_prompts": len(prune_h) + len(extra), "heldout_prompts": len(held_h),
        "pruning_examples": len(ex_prune), "heldout_examples": len(ex_held),
        "retain_examples": len(ex_retain), "benign_heldout_examples": len(ex_held_b),
        "generation_prompts": len(gen_prompts), "categories": sorted({e.category for e in harmful}),
        **ans_info,
    }
    timings = {**stages.timings, "load": {"seconds": load_seconds}}
    metrics = write_report(
        run_dir, cfg=cfg, model=model, model_source=source, data=data, masks=masks, results=results,
        overlap=mk_info["overlap"], baselines=baselines,
        timings=timings, wall_seconds=time.perf_counter() - t_start,
    )
    return metrics


def candidate_fraction(cfg) -> float | None:
    """The fraction of each matrix the scores stage keeps per score tree (the largest q,
    category_q and p the masks use), or None when it must keep dense trees: on request
    (`scoring.keep_dense_scores`) or for granularity "row"/"global", which per-matrix
    candidates cannot serve."""
    M = cfg.masks
    if cfg.scoring.keep_dense_scores or M.granularity != "matrix":
        return None
    return float(max([*M.q_sweep, M.category_q, M.p]))


def _masked_params(model, mask_dir: str | None):
    """The model's params with the mask in `mask_dir` applied (the params as they are for None)."""
    if not mask_dir:
        return model.params
    from harmjax.masks import apply_mask, load_mask

    return apply_mask(model.params, load_mask(mask_dir, model.params)[0])


def _file_name(entry) -> str:
    return "unpruned" if entry.get("kind") == "none" else os.path.basename(entry["dir"])


def _generation_subset(held, rows, n: int):
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


def _judge(J, model):
    """The StrongREJECT fine-tuned evaluator as a callable, when its local files are given."""
    if not J.finetuned_base:
        return None
    from harmjax.evaluate import load_finetuned_judge, score_finetuned
    from harmjax.io.hf import resolve_checkpoint

    # Local directories, or hub ids found in the hub cache (or fetched where the hub is reachable).
    base, adapter = resolve_checkpoint(J.finetuned_base), resolve_checkpoint(J.finetuned_adapter)
    judge = load_finetuned_judge(base, adapter, J.template or None, dtype=J.dtype,
                                 mesh=model.mesh, max_response_tokens=J.max_response_tokens)
    return lambda prompts, responses: score_finetuned(judge, prompts, responses, batch_size=J.batch_size,
                                                      progress=False)


def _utility(U, model):
    """Zero-shot multiple-choice accuracies as a callable params -> metrics, when tasks are given."""
    if not U.mc_tasks:
        return None
    from harmjax.evaluate import load_mc_task, multiple_choice_accuracy

    paths = dict(kv.split("=", 1) for kv in U.mc_paths.split(",") if kv) if U.mc_paths else {}
    tasks = {t: load_mc_task(t, paths.get(t), limit=U.limit or None) for t in U.mc_tasks.split(",") if t}

    def run(params):
        return {f"mc_{t}": multiple_choice_accuracy(model, items, batch_size=U.batch_size, params=params)["acc"]
                for t, items in tasks.items()}

    return run


__all__ = ["candidate_fraction", "run_experiment", "default_run_dir"]
