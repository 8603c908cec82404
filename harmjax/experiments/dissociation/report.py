"""Dissociation's report: report.md, metrics.json and dissociation.png, with the 2 x 2 table
and the verdict."""

from __future__ import annotations

import math
import os
from typing import Any

from harmjax.experiments.core.report import SPECS, publish_report, timings_markdown
from harmjax.evaluate.bootstrap import fmt_interval
from harmjax.experiments.dissociation.intervals import with_intervals
from harmjax.experiments.dissociation.measures import MASKS, verdict
from harmjax.experiments.dissociation.plots import plot_deltas

_ROWS = [  # (key, label); formats from `core.report.SPECS`
    ("harm_nll", "harmful-answer NLL under the attack (nats/token)"),
    ("attack_harmful_rate", "prefilling attack: continuations not refused"),
    ("refusal_rate", "refusal rate without attack (keyword rule)"),
    ("refusal_rate_phrase", "refusal rate without attack (refusal phrases only)"),
    ("recognition_auroc", "recognition AUROC (yes/no log-odds, harmful vs benign)"),
    ("recognition_separation", "recognition log-odds: harmful mean - benign mean"),
    ("explanation_nll", "explanation NLL (nats/token)"),
    ("benign_nll", "benign-answer NLL (nats/token)"),
]


def _shown(cell) -> str:
    """A cell's reading: yes (holds, interval clears), inconclusive (holds on the point estimate only), no."""
    return "yes" if cell["shown"] else ("inconclusive" if cell["holds"] else "no")


def _fmt(fmt: str, x) -> str:
    try:
        return "n/a" if x is None or not math.isfinite(float(x)) else fmt.format(float(x))
    except (TypeError, ValueError):
        return str(x)


def write_dissociation_report(run_dir: str, *, cfg, source: str, data, sizes, results, timings,
                              wall_seconds: float) -> dict[str, Any]:
    """Writes report.md, metrics.json and dissociation.png; returns the metrics."""
    v = with_intervals(verdict(results, cfg.verdict), results, cfg.verdict, seed=cfg.seed)
    table = {name: {k: results[name].get(k) for k, _ in _ROWS} for name in MASKS}
    metrics = {"model": source, "data": data, "mask_sizes": sizes, "table": table, "verdict": v,
               "timings": timings, "wall_seconds": wall_seconds,
               "results": results,
               "settings": cfg.to_dict()}
    plot_deltas(os.path.join(run_dir, "dissociation.png"), v["deltas"])

    lines = ["# Dissociation (Orgad et al. claim 5)", "",
             f"Model: `{source}`. Masks T_q \\ T_p(retain), q={cfg.masks.q:g}, p={cfg.masks.p:g}, "
             f"granularity {cfg.masks.granularity}; random controls of matched size per matrix.", "",
             "Data: " + ", ".join(f"{k}={v_}" for k, v_ in data.items()), "",
             "Mask sizes: " + ", ".join(f"{k}: {s['total']} weights ({s['fraction']:.2e})" for k, s in sizes.items()),
             "", "## 2 x 2 (excess over the random control)", "",
             "| mask | harmful generation under attack | refusal / recognition / explanation |", "|---|---|---|"]
    c = v["cells"]
    d = v["deltas"]
    for key, label in (("harm", "harm mask"), ("refusal", "refusal mask")):
        g, rr = c[f"{key}_mask/harmful_generation"], c[f"{key}_mask/refusal_recognition"]
        x, ci = d[key], v["excess_ci"][key]
        lines.append(
            f"| {label} | NLL {x['x_harm_nll']:+.3f}{fmt_interval(ci['harm_nll'], '{:+.3f}')}, attack rate "
            f"{x['x_attack_harmful_rate']:+.0%} (expected {g['expected']}: {_shown(g)}) | refusal "
            f"{x['x_refusal_rate']:+.0%}{fmt_interval(ci['refusal_rate'], '{:+.0%}')}, AUROC {x['x_auroc']:+.3f}"
            f"{fmt_interval(ci['auroc'], '{:+.3f}')}, explanation NLL {x['x_explanation_nll']:+.3f}"
            f"{fmt_interval(ci['explanation_nll'], '{:+.3f}')} (expected {rr['expected']}: {_shown(rr)}) |")
    lines += ["", f"**Verdict: {v['outcome']}.**", "", "Rule (every change minus that of the random control "
              f"matched to the mask; refusal rate = `{v['refusal_metric']}`):", ""]
    lines += [f"- {k}: {cell['expected']} when {cell['rule']}; value {cell['value']:+.3f} -> "
              f"{'holds' if cell['holds'] else 'fails'}, interval {'clears' if cell['clears'] else 'does not clear'}"
              for k, cell in c.items()]
    lines.append(f"- intervals (in brackets in the table): {v['bootstrap']['rule']}; \"affected\" needs the whole "
                 "interval beyond the effect threshold, \"spared\" needs it inside the sparing bound.")
    lines.append("- double dissociation: all four hold; single: one mask's row holds.")
    base_auroc = results["none"].get("recognition_auroc")
    if base_auroc is not None and math.isfinite(base_auroc) and base_auroc < 0.6:
        lines += ["", f"Note: the unmasked model's recognition AUROC is {base_auroc:.2f} (chance is 0.5): it does "
                  "not tell harmful from benign requests by its yes/no answer, so the recognition cell can only show "
                  "that a mask leaves this (absent) ability unchanged."]
    lines += ["",
              "## Per mask (held-out prompts)", "", "| measure | " + " | ".join(MASKS) + " |",
              "|---|" + "---|" * len(MASKS)]
    for k, label in _ROWS:
        lines.append(f"| {label} | " + " | ".join(_fmt(SPECS[k], table[m][k]) for m in MASKS) + " |")
    lines += ["", "![changes](dissociation.png)", "", "## Samples (first held-out prompts)", ""]
    for s_none, s_harm, s_ref in list(zip(*(results[m]["samples"] for m in ("none", "harm", "refusal"))))[:4]:
        lines.append(f"- **{s_none['prompt'][:120]}**")
        for name, s in (("none", s_none), ("harm", s_harm), ("refusal", s_ref)):
            lines.append(f"  - {name}: plain `{s['answer'][:100]!r}`; attacked `{s['attacked_answer'][:100]!r}`; "
                         f"yes/no log-odds {s['recognition_logodds']:+.2f}")
    lines += ["", "## Timings", "", timings_markdown(timings) + f"- wall: {wall_seconds:.1f} s"]
    publish_report(run_dir, metrics, lambda: "\n".join(lines) + "\n")
    return metrics
