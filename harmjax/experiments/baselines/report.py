"""The comparison's report over all models: report.md, metrics.json and baselines.png."""

from __future__ import annotations

import os
from typing import Any

from harmjax.evaluate.bootstrap import fmt_interval, rule_text
from harmjax.experiments.baselines.measures import INTERVENTIONS, LABELS, MEASURES, changes, classify, rule_lines
from harmjax.experiments.baselines.plots import plot_changes
from harmjax.experiments.core.report import fmt, publish_report, timings_markdown

_SPEC = {"harm_nll": "{:.3f}", "benign_nll": "{:.3f}", "recognition_auroc": "{:.3f}", "refusal_rate": "{:.0%}",
         "over_refusal": "{:.0%}"}
_DSPEC = {"harm_nll": "{:+.3f}", "benign_nll": "{:+.3f}", "recognition_auroc": "{:+.3f}", "refusal_rate": "{:+.0%}",
          "over_refusal": "{:+.0%}"}


def model_summary(m: dict[str, Any], cfg) -> dict[str, Any]:
    """One model's changes (with intervals) and each intervention's reading."""
    ch = changes(m["results"], cfg.rule.refusal_metric == "refusal_rate_phrase", cfg.seed)
    readings = {n: classify(ch["deltas"][n], ch["ci"][n], cfg.rule) for n in ch["deltas"]}
    separates = {k: bool(ci[0] is not None and (ci[0] > 0 or ci[1] < 0)) for k, ci in ch["separates"].items()}
    return {**ch, "readings": readings, "separating_measures": separates}


def _model_lines(label: str, m: dict[str, Any], s: dict[str, Any]) -> list[str]:
    d = m["direction"]
    add = d["addition"]
    lines = [f"## {label}: `{m['source']}`", "",
             "Data: " + ", ".join(f"{k}={v}" for k, v in m["data"].items()), "",
             "Masks (pruned weights): " + ", ".join(f"{k} {v['total']:,} ({v['fraction']:.2e})"
                                                   for k, v in m["sizes"].items()), "",
             f"Refusal direction: layer {d['layer']}, position {d['position']} of {d['candidates']} candidates "
             f"({'passed' if d['passed_filters'] else 'NO candidate passed'} the induce/KL filters; bypass "
             f"{d['chosen']['bypass']:+.2f} vs {d['baseline']['harmful']:+.2f} unedited, KL {d['chosen']['kl']:.3f}). "
             f"Activation addition (refusal-inducing check) on {add['prompts']} benign held-out prompts: refusal "
             f"{fmt(add['refusal_plain'], '{:.0%}')} -> {fmt(add['refusal_added'], '{:.0%}')}.", "",
             "| measure | " + " | ".join(INTERVENTIONS) + " |", "|---|" + "---|" * len(INTERVENTIONS)]
    for k in MEASURES:
        cells = [fmt(s["values"]["none"][k], _SPEC[k])]
        for n in INTERVENTIONS[1:]:
            cells.append(f"{fmt(s['values'][n][k], _SPEC[k])} ({fmt(s['deltas'][n][k], _DSPEC[k])}"
                         f"{fmt_interval(s['ci'][n][k], _DSPEC[k])})")
        lines.append(f"| {LABELS[k]} | " + " | ".join(cells) + " |")
    lines += ["", "| intervention | reading | benign NLL |", "|---|---|---|"]
    for n, r in s["readings"].items():
        lines.append(f"| {n} | {r['reading']} | {'breaks text' if r['benign_broken'] else 'ok'} |")
    if s["separates"]:
        sep = [LABELS[k] + fmt_interval(s["separates"][k], _DSPEC[k]) for k, v in s["separating_measures"].items() if v]
        lines += ["", "Measures that separate the harm mask from the direction ablation (interval of the difference of "
                  "their changes excludes 0): " + ("; ".join(sep) if sep else "none") + "."]
    return lines + [""]


def write_baselines_report(out_dir: str, cfg, per_model: dict[str, dict[str, Any]], wall_seconds: float) -> dict:
    """Writes report.md, metrics.json and baselines.png in `out_dir`; returns the metrics."""
    os.makedirs(out_dir, exist_ok=True)
    summaries = {label: model_summary(m, cfg) for label, m in per_model.items()}
    plot_changes(os.path.join(out_dir, "baselines.png"), summaries)
    metrics = {"models": {label: {**{k: v for k, v in m.items() if k != "results"}, **summaries[label],
                                  "results": {n: {k: v for k, v in r.items() if k not in ("samples", "over_refusal")}
                                              for n, r in m["results"].items()}}
                          for label, m in per_model.items()},
               "wall_seconds": wall_seconds, "settings": cfg.to_dict()}

    def markdown():
        lines = ["# Baselines: harm mask, refusal direction, Wanda, magnitude, random", "",
                 f"Masks at q={cfg.masks.q:g}, p={cfg.masks.p:g}; wanda, magnitude and random pruned at the harm "
                 "mask's count in every matrix. Cells: value (change from the unmodified model [95% interval]).", "",
                 "Rule:", ""] + [f"- {x}" for x in rule_lines(cfg.rule)]
        lines += [f"- refusal rate = `{cfg.rule.refusal_metric}`; intervals: {rule_text(seed=cfg.seed)}", ""]
        for label, m in per_model.items():
            lines += _model_lines(label, m, summaries[label])
        lines += ["![changes per measure](baselines.png)", "", "## Timings", ""]
        for label, m in per_model.items():
            lines += [f"{label}:", "", timings_markdown(m["timings"])]
        return "\n".join(lines) + f"\n- wall: {wall_seconds:.1f} s\n"

    def summary():
        return "\n".join(f"{label}: " + ", ".join(f"{n} {r['reading']}" for n, r in s["readings"].items())
                         for label, s in summaries.items())

    publish_report(out_dir, metrics, markdown, summary)
    return metrics


__all__ = ["model_summary", "write_baselines_report"]
