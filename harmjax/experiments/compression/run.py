"""Claim 3 (alignment compresses the harm mechanism): the experiment on a less aligned model A
and an aligned model B, side by side.

  run_experiment(A) and run_experiment(B)   each in its own run directory, every stage cached
  -> per model, the q sweep as a curve: fraction of scored weights pruned, Δ harmful NLL,
     Δ benign NLL (held-out answers, nats/token, against the unpruned model)
  -> the compression figure: the smallest pruned fraction whose harmful-NLL rise reaches
     `harm_target` while the benign-NLL rise stays within `benign_budget` (interpolated
     linearly in log10(fraction) between sweep points), and the area under Δ harmful over
     log10(fraction) on the segments within the budget
  -> one plot with both curves, report.md, metrics.json, and the verdict (`VERDICT_RULE`).

`run_compression(cfg)` takes the settings of configs/compression_embedded.py. For the embedded
default A is SmolLM2-135M-Instruct and B its refusal-tuned variant (model "refusal", made by
`harmjax.experiments.refusal.run.ensure_refusal_model`); the paper configs pair a base model with
its instruct model.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

from harmjax import distributed
from harmjax.experiments.compression.measures import (
    MODELS, VERDICT_RULE, area_within_budget, compare, compression_curve, fraction_at_target, with_interval,
)
from harmjax.experiments.core.report import publish_report
from harmjax.experiments.core.stages import as_config, slug


def experiment_config(cfg, key: str, out_dir: str, progress: bool = True):
    """The `run_experiment` config of model `key` ("model_a" / "model_b"): the shared
    `experiment` block with that model's source and run directory."""
    from harmjax.experiments.refusal.source import resolve_source

    model_cfg = cfg[key]
    exp = copy.deepcopy(cfg.experiment)
    refusal = _refusal_config(cfg)
    exp.model = resolve_source(model_cfg.model, refusal, experiment_cfg=exp, progress=progress)
    exp.output_dir = model_cfg.output_dir or os.path.join(out_dir, slug(model_cfg.label))
    return exp


def _refusal_config(cfg):
    """The refusal-tuning settings, with the experiment's prompt split and seed (the tuned model
    must never train on the experiment's held-out prompts), or None."""
    if "refusal" not in cfg or cfg.refusal is None:
        return None
    refusal_cfg = copy.deepcopy(cfg.refusal)
    refusal_cfg.prompts = copy.deepcopy(cfg.experiment.prompts)
    refusal_cfg.prompts_seed = cfg.experiment.seed
    return refusal_cfg


def run_compression(cfg, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) the experiment on both models, compares their sweeps and writes
    report.md, metrics.json and compression.png into cfg.output_dir; returns the metrics."""
    from harmjax.experiments.compression.plots import plot_compression
    from harmjax.experiments.compression.report import markdown, summary_text
    from harmjax.experiments.main.run import run_experiment

    cfg = as_config(cfg)
    t_start = time.perf_counter()
    out_dir = cfg.output_dir or os.path.join("runs", f"compression-{slug(cfg.model_a.label)}-{slug(cfg.model_b.label)}")
    os.makedirs(out_dir, exist_ok=True)
    compression_cfg = cfg.compression
    models = {}
    for key in MODELS:
        t0 = time.perf_counter()
        exp = experiment_config(cfg, key, out_dir, progress)
        m = run_experiment(exp, progress=progress)
        models[key] = {
            "label": cfg[key].label, "model": cfg[key].model, "source": exp.model, "run_dir": exp.output_dir,
            "parameters": m["model"]["parameters"], "baseline": {k: m["baseline"].get(k) for k in (
                "harm_nll", "benign_nll", "refusal_rate", "strongreject")},
            "curve": compression_curve(m), "per_prompt": m["bootstrap"]["per_prompt"], "seconds": time.perf_counter() - t0,
            "cached": all(v.get("cached") for k, v in m["timings"].items() if k != "load"),
        }
    result = compare(models["model_a"]["curve"], models["model_b"]["curve"], compression_cfg.harm_target,
                     compression_cfg.benign_budget)
    result = with_interval(result, [models[k]["curve"] for k in MODELS], [models[k]["per_prompt"] for k in MODELS],
                           seed=cfg.experiment.seed)
    plot = distributed.broadcast_json(plot_compression(out_dir, models, result) if distributed.is_writer() else None)
    metrics = {"settings": cfg.to_dict(), "models": models, "compression": result, "plot": plot,
               "wall_seconds": time.perf_counter() - t_start}
    publish_report(out_dir, metrics, lambda: markdown(metrics), lambda: summary_text(metrics, out_dir))
    return metrics


__all__ = ["VERDICT_RULE", "area_within_budget", "compare", "compression_curve", "experiment_config",
           "fraction_at_target", "run_compression"]
