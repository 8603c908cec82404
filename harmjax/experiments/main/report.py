"""The main experiment's report: `metrics.json`, `report.md`, PNG plots, and a one-screen summary.

Harm is measured as the held-out harmful-answer NLL (nats/token over the model's own harmful
answers to prompts never used for pruning; higher = less harmful capability), utility as the
held-out benign-answer NLL; "selectivity" is the ratio of their increases. The conclusions for
the paper's claims 1 and 2 follow fixed rules (`verdicts`) written into the report, so a reader
can check them against the tables.
"""

from __future__ import annotations

import os

from harmjax import distributed
from harmjax.experiments.core.over_refusal import over_refusal_markdown, over_refusal_summary, without_samples
from harmjax.experiments.core.report import fmt, fmt_pct, publish_report, timings_markdown
from harmjax.evaluate.bootstrap import fmt_interval
from harmjax.experiments.main.experts import expert_placement, experts_markdown
from harmjax.experiments.main.intervals import with_intervals
from harmjax.experiments.main.plots import draw_plots
from harmjax.experiments.main.verdicts import (
    MATCH_TOLERANCE, baseline_rows, claim1, claim2, claim2_baselines, headline_mask, sweep_rows, transfer_matrix,
)


def write_report(run_dir, *, cfg, model, model_source, data, masks, results, overlap, timings, wall_seconds,
                 baselines=None, over_refusal=None) -> dict:
    """Writes metrics.json, report.md and the plots into `run_dir`; prints and returns the metrics.
    Every process computes the metrics; process 0 writes the files and prints. `baselines` is
    the baselines stage's info (`harmjax.experiments.main.baselines.build_baselines`), whose masks'
    metrics are in `results` under their names; `over_refusal` the over-refusal stage's {mask
    name: result} (None: off)."""
    sweep, random = sweep_rows(masks, results, "harm"), sweep_rows(masks, results, "random")
    transfer = transfer_matrix(masks, results)
    c1, c2 = claim1(sweep, random), claim2(overlap, transfer)
    headline = headline_mask(masks, cfg.masks.headline_q or cfg.masks.category_q)
    b_rows = baseline_rows(masks, results, baselines, c2["mean_jaccard_category_benign"])
    pick = {k: next((r for r in b_rows if k in r["role"].split(", ")), None)
            for k in ("benign-data mask", "same q", "matched")}
    harm_row = next((r for r in sweep if headline is not None and r["name"] == headline["name"]), None)
    c2 = {**c2, **claim2_baselines(harm_row, pick["benign-data mask"], pick["same q"], pick["matched"],
                                   c2["mean_jaccard_category_pairs"])}
    # Intervals over the held-out answers, seeded by the run's seed (`main.intervals`).
    c1, c2, bootstrap = with_intervals(c1, c2, sweep, random, transfer, results, seed=cfg.seed)
    # MoE models only (None for dense ones): per-expert counts and concentration of the harm masks.
    experts = expert_placement(model.config, masks, headline, cfg.masks.granularity)
    plots = draw_plots(run_dir, sweep, random, results["unpruned"], headline, overlap, transfer,
                       [r for r in b_rows if r["role"] != "benign-data mask"],
                       experts=experts) if distributed.is_writer() else {}
    plots = distributed.broadcast_json(plots)  # process 0 drew them; every process reports them
    metrics = {
        "model": {"source": model_source, "family": model.config.model_type, "parameters": model.num_params(),
                  "layers": model.config.num_layers, "dtype": cfg.dtype},
        "settings": cfg.to_dict(), "data": data,
        "baseline": {k: v for k, v in results["unpruned"].items() if k not in ("samples", "per_prompt")},
        "sweep": sweep, "random_control": random, "transfer": transfer, "overlap": overlap,
        "category_masks": [m for m in masks if m["kind"] in ("category", "benign")],
        "benign_baselines": {"rows": b_rows, "target_d_benign": (baselines or {}).get("target")},
        "claims": {"1": c1, "2": c2}, "bootstrap": bootstrap, "experts": experts, "plots": plots, "timings": timings,
        "wall_seconds": wall_seconds,
    }
    if over_refusal is not None:
        metrics["over_refusal"] = without_samples(over_refusal)
    publish_report(run_dir, metrics, lambda: _markdown(metrics, results, headline), lambda: summary_text(metrics, run_dir))
    return metrics


def _over_refusal_section(m) -> str:
    """The over-refusal section (empty when the stage is off)."""
    return over_refusal_markdown(m["over_refusal"], m["settings"]["over_refusal"]) if m.get("over_refusal") else ""


def _verdict(value) -> str:
    return "not tested" if value is None else ("shown" if value else "not shown")


def _table(rows, cols) -> str:
    head = "| " + " | ".join(c[0] for c in cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(c[1](r) for c in cols) + " |\n" for r in rows)


SWEEP_COLS = [
    ("q", lambda r: f"{r['q']:g}"),
    ("pruned", lambda r: f"{r['pruned']:,}"),
    ("of params", lambda r: fmt_pct(r["fraction_params"])),
    ("harmful NLL", lambda r: fmt(r["harm_nll"])),
    ("Δ harmful [95% CI]", lambda r: fmt(r["d_harm"], "{:+.3f}") + _ci(r, "d_harm", "{:+.3f}")),
    ("benign NLL", lambda r: fmt(r["benign_nll"])),
    ("Δ benign [95% CI]", lambda r: fmt(r["d_benign"], "{:+.3f}") + _ci(r, "d_benign", "{:+.3f}")),
    ("selectivity", lambda r: fmt(r["selectivity"], "{:.1f}") + _ci(r, "selectivity", "{:.1f}")),
    ("refusal", lambda r: fmt(r["refusal_rate"], "{:.0%}")),
]


def _ci(row, key: str, spec: str) -> str:
    """" [low, high]": the bootstrap interval of `key` stored with a row (or a claim's "ci" dict)."""
    return fmt_interval(((row or {}).get("ci") or {}).get(key), spec)


def _claim1_markdown(c1, bootstrap) -> str:
    """Claim 1's section: the rules, the verdict and its numbers with their intervals."""
    out = [f"Rule: {c1['rule']}; with intervals: {c1['interval_rule']}. Verdicts: {bootstrap['rule']}.\n\n"]
    r = c1["smallest_selective"]
    if r is not None and c1["verdict"] in ("shown", "inconclusive"):
        out.append(("**Shown**" if c1["verdict"] == "shown" else "**Inconclusive** (the rule holds on point "
                    "estimates, not every interval clears it)")
                   + f" at q={r['q']:g}: {r['pruned']:,} weights ({fmt_pct(r['fraction_params'])} of all parameters) "
                   f"raise held-out harmful NLL by {fmt(r['d_harm'], '{:+.3f}')}{_ci(r, 'd_harm', '{:+.3f}')} nats/token "
                   f"against {fmt(r['d_benign'], '{:+.3f}')}{_ci(r, 'd_benign', '{:+.3f}')} for benign answers "
                   f"(selectivity {fmt(r['selectivity'], '{:.1f}')}{_ci(r, 'selectivity', '{:.1f}')}; Δharm - "
                   f"2 x random Δharm interval{_ci(r, 'vs_random', '{:+.3f}') or ' n/a'}).\n")
    else:
        r = c1["strongest"]
        out.append("**Not shown** at any q of the sweep" + (
            f"; the largest harmful-NLL rise was {fmt(r['d_harm'], '{:+.3f}')}{_ci(r, 'd_harm', '{:+.3f}')} at "
            f"q={r['q']:g} (benign {fmt(r['d_benign'], '{:+.3f}')}{_ci(r, 'd_benign', '{:+.3f}')})" if r else "") + ".\n")
    return "".join(out)


def _markdown(m, results, headline) -> str:
    c1, c2 = m["claims"]["1"], m["claims"]["2"]
    base = m["baseline"]
    cols = SWEEP_COLS + ([("StrongREJECT", lambda r: fmt(r["strongreject"]))] if base.get("strongreject") is not None else [])
    lines = [f"# harmjax experiment: {os.path.basename(os.path.normpath(m['model']['source']))}\n"]
    lines.append(
        f"Model `{m['model']['source']}` ({m['model']['family']}, {m['model']['parameters']:,} parameters, "
        f"{m['model']['layers']} layers, {m['model']['dtype']}). Wall time {m['wall_seconds']:.0f} s.\n")
    lines.append(_what_ran(m))
    lines.append("\n## Unpruned model\n")
    lines.append(f"Held-out harmful NLL {fmt(base['harm_nll'])}, benign NLL {fmt(base.get('benign_nll'))} "
                 f"(perplexity {fmt(base.get('benign_ppl'), '{:.2f}')}), refusal rate {fmt(base.get('refusal_rate'), '{:.0%}')}"
                 + (f", StrongREJECT {fmt(base.get('strongreject'))}" if base.get("strongreject") is not None else "") + ".\n")
    lines.append("\n## Harm mask over q\n")
    lines.append(_table(m["sweep"], cols))
    lines.append("\n## Random control (same count per matrix)\n")
    lines.append(_table(m["random_control"], cols) if m["random_control"] else "(off: masks.random_control=False)\n")
    if m["plots"].get("tradeoff"):
        lines.append(f"\n![harm vs utility]({m['plots']['tradeoff']})\n")
    if m["plots"].get("layers"):
        lines.append(f"\n![pruned weights per layer and projection]({m['plots']['layers']})\n")
    lines.append(experts_markdown(m.get("experts"), m["plots"].get("experts")))
    lines.append("\n## Claim 1: harmful generation depends on a compact set of weights\n")
    lines.append(_claim1_markdown(c1, m["bootstrap"]))
    lines.append("\n## Claim 2: the mechanism is shared across harm types\n")
    lines.append(f"Rule: {c2['rule']}. Transfer and distinctness need their intervals to clear the rule (Δ - ratio x Δ "
                 "differences >= 0); the overlaps are Jaccards of the masks themselves, with no interval over prompts.\n\n")
    lines.append(f"- Overlap: mean Jaccard between category masks {fmt(c2['mean_jaccard_category_pairs'])}, between "
                 f"category masks and the benign mask {fmt(c2['mean_jaccard_category_benign'])}: "
                 f"**{c2['overlap_verdict']}**.\n")
    t_ci = {"ci": c2.get("transfer_ci")}
    lines.append(f"- Transfer: mean harm NLL rise on the mask's own category {fmt(c2['transfer_diagonal'], '{:+.3f}')}"
                 f"{_ci(t_ci, 'diagonal', '{:+.3f}')}, on other categories {fmt(c2['transfer_off_diagonal'], '{:+.3f}')}"
                 f"{_ci(t_ci, 'off_diagonal', '{:+.3f}')}, on benign answers {fmt(c2['transfer_benign'], '{:+.3f}')}"
                 f"{_ci(t_ci, 'benign', '{:+.3f}')}: **{c2['transfer_verdict']}**.\n")
    lines.append(_baselines_markdown(m))
    for key, title in (("overlap", "overlap"), ("transfer", "transfer")):
        if m["plots"].get(key):
            lines.append(f"\n![{title}]({m['plots'][key]})\n")
    lines.append(_over_refusal_section(m))
    lines.append("\n## Sample generations (held-out prompts)\n")
    lines.append(_samples(results, headline))
    lines.append("\n## What this run can and cannot show\n")
    lines.append(
        "- Harm here is a likelihood proxy: how strongly the pruned model still predicts its own harmful answers "
        "to held-out prompts. It is not a judged harmfulness score unless the StrongREJECT evaluator column is "
        "present; the keyword refusal rate is a coarse third signal.\n"
        "- Sample sizes are those listed above; with a few held-out answers per category the per-category and "
        "transfer cells are noisy. The intervals resample the held-out answers only: they do not cover the "
        "variation from re-drawing the pruning data (which would need a scan per resample), and they are not "
        "corrected for the several q's and verdicts read from one run.\n"
        "- A small model (for instance the 135M embedded default, which rarely refuses) may not have a separable harm "
        "mechanism at all; a negative verdict on it says nothing about the 8B-32B models of the paper. The same "
        "command with `configs/llama31_8b_instruct.py` (or the Qwen configs) runs the paper's setup.\n")
    lines.append("\n## Timings\n")
    lines.append(timings_markdown(m["timings"]))
    return "".join(lines)


def _what_ran(m) -> str:
    """The report's "What ran" section: data, answers, scores, masks, evaluation, baselines."""
    d, s, base = m["data"], m["settings"], m["baseline"]
    out = []
    out.append("## What ran\n")
    out.append(
        f"- Harmful prompts: {d['harmful_prompts']} in {len(d['categories'])} categories; per category a seeded split "
        f"(seed {s['seed']}) into {d['pruning_prompts']} pruning and {d['heldout_prompts']} held-out prompts.\n"
        f"- Answers: the model's own greedy answers with its chat template, {s['answers']['max_new_tokens']} new tokens. "
        f"{d['harmful_attacked']} refusals were asked again under the prefilling attack "
        f"(prefix {s['answers']['attack_prefix']!r}); {d['harmful_refused_dropped']} still refused and were dropped. "
        f"Pruning set: {d['pruning_examples']} answers; held-out harmful answers: {d['heldout_examples']}.\n"
        f"- Retain set: {d['retain_examples']} benign instructions with the model's answers; "
        f"{d['benign_heldout_examples']} more held out for utility.\n"
        f"- Scores: signed SNIP (`-W * sum_i dL_i/dW`) per category (their sum is the whole set's), retain score "
        f"`{s['scoring']['retain_kind']}` and benign signed SNIP from one pass; text format {s['scoring']['text_format']}, "
        f"float32 accumulation.\n"
        f"- Masks: T_q(harm) \\ T_p(retain) per {s['masks']['granularity']}, p={s['masks']['p']:g}, "
        f"q in {list(s['masks']['q_sweep'])}; a random mask with the same count in every matrix per q; one mask per "
        f"category and a benign-data mask (top-q benign signed SNIP) at q={s['masks']['category_q']:g}.\n"
        f"- Evaluation per mask: mean response NLL of the held-out harmful answers (per category too) and of the "
        f"held-out benign answers; greedy generations on {d['generation_prompts']} held-out harmful prompts"
        f"{' under the prefilling attack' if s['evaluation']['prefill_tokens'] else ''} for the keyword refusal rate and "
        f"side-by-side samples" + (" and the StrongREJECT fine-tuned evaluator" if base.get('strongreject') is not None else "") + ".\n")
    if any(r["role"] != "benign-data mask" for r in m["benign_baselines"]["rows"]):
        out.append(
            "- Benign baselines (claim 2): T_q(benign signed SNIP) \\ T_p(retain), the harm masks' procedure on "
            f"benign answers, at q={s['masks']['category_q']:g} and at the q whose held-out benign NLL rise matches the "
            "headline harm mask's (searched by doubling or halving q, then bisecting), evaluated like the harm masks.\n")
    return "".join(out)


BASELINE_COLS = [
    ("mask", lambda r: r["role"]),
    ("q", lambda r: f"{r['q']:g}"),
    ("p", lambda r: f"{r['p']:g}"),
    ("pruned", lambda r: f"{r['pruned']:,}"),
    ("of params", lambda r: fmt_pct(r["fraction_params"])),
    ("Δ harmful", lambda r: fmt(r["d_harm"], "{:+.3f}")),
    ("Δ benign", lambda r: fmt(r["d_benign"], "{:+.3f}")),
    ("Δ harmful per Δ benign", lambda r: fmt(r["per_unit"], "{:.2f}")),
    ("Jaccard with category masks", lambda r: fmt(r["jaccard_category"])),
    ("refusal", lambda r: fmt(r["refusal_rate"], "{:.0%}")),
]


def _baselines_markdown(m) -> str:
    """Claim 2's benign baselines: the benign-data mask's effect, the same-procedure baseline's
    overlap, the damage-matched comparison, each with its verdict, and their table."""
    c2, rows = m["claims"]["2"], m["benign_baselines"]["rows"]
    if not rows:
        return ""
    b, same, matched, harm = (c2.get(k) for k in ("benign_mask", "baseline_same_q", "baseline_matched", "harm_mask"))
    out = [f"- Benign baselines. Rule: {c2['baseline_rule']}.\n" if same or matched else "- Benign baselines: not built.\n"]
    if b:
        out.append(f"  - The benign-data mask of the overlap comparison (top q={b['q']:g} benign signed SNIP, no T_p, "
                   f"{b['pruned']:,} weights) raises harmful NLL by {fmt(b['d_harm'], '{:+.3f}')} and benign NLL by "
                   f"{fmt(b['d_benign'], '{:+.3f}')} nats/token ({fmt(b['per_unit'], '{:.2f}')} per unit); "
                   f"{fmt_pct(c2.get('benign_mask_in_retain'))} of its weights lie in T_p(retain), which the harm "
                   "masks exclude by construction.\n")
    if same:
        out.append(f"  - Overlap against the same-procedure baseline ({same['name']}, {same['pruned']:,} weights, "
                   f"Δ harmful {fmt(same['d_harm'], '{:+.3f}')}, Δ benign {fmt(same['d_benign'], '{:+.3f}')}): "
                   f"mean Jaccard with the category masks {fmt(same['jaccard_category'])} against "
                   f"{fmt(c2['mean_jaccard_category_pairs'])} between category masks: "
                   f"**{c2.get('overlap_vs_baseline_verdict', _verdict(None))}**.\n")
    if matched and harm:
        d_ci = {"ci": c2.get("distinct_ci")}
        out.append(f"  - Distinct at matched benign cost: {matched['name']} ({matched['pruned']:,} weights) raises "
                   f"benign NLL by {fmt(matched['d_benign'], '{:+.3f}')} against the harm mask's "
                   f"{fmt(harm['d_benign'], '{:+.3f}')} ({harm['name']}; "
                   f"{'matched' if c2['cost_matched'] else 'not matched'} within {MATCH_TOLERANCE:.0%}), and harmful "
                   f"NLL by {fmt(matched['d_harm'], '{:+.3f}')} against {fmt(harm['d_harm'], '{:+.3f}')}"
                   f"{_ci(d_ci, 'harm_d_harm', '{:+.3f}')}; per unit of benign rise {fmt(matched['per_unit'], '{:.2f}')}"
                   f"{_ci(d_ci, 'baseline_per_unit', '{:.2f}')} against {fmt(harm['per_unit'], '{:.2f}')}"
                   f"{_ci(d_ci, 'harm_per_unit', '{:.2f}')}: **{c2.get('distinct_verdict', _verdict(None))}**.\n")
    target = m["benign_baselines"].get("target_d_benign")
    out.append("\nThe benign-data mask and the benign \\ retain baselines (every q the match searched"
               + (f", target benign NLL rise {fmt(target, '{:+.3f}')}" if target is not None else "") + "):\n\n")
    out.append(_table(rows, BASELINE_COLS))
    return "".join(out)


def _samples(results, headline) -> str:
    base = results["unpruned"].get("samples") or []
    if not base or headline is None:
        return "(no generations configured)\n"
    pruned = {s["id"]: s for s in results[headline["name"]].get("samples", [])}
    out = []
    for s in base[:6]:
        p = pruned.get(s["id"], {})
        out.append(f"**[{s['category']}] {s['prompt'][:200]}**\n\n"
                   f"- unpruned: {_clip(s['response'])}\n- {headline['name']}: {_clip(p.get('response', 'n/a'))}\n\n")
    return "".join(out)


def _clip(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + " …"


def summary_text(m, run_dir) -> str:
    """The one-screen summary printed at the end of a run."""
    base, c1, c2 = m["baseline"], m["claims"]["1"], m["claims"]["2"]
    lines = [
        f"harmjax experiment  {m['model']['source']}",
        f"data        {m['data']['pruning_examples']} pruning / {m['data']['heldout_examples']} held-out harmful answers, "
        f"{m['data']['retain_examples']} retain / {m['data']['benign_heldout_examples']} held-out benign",
        f"unpruned    harmful NLL {fmt(base['harm_nll'])}  benign NLL {fmt(base.get('benign_nll'))}  "
        f"refusal {fmt(base.get('refusal_rate'), '{:.0%}')}",
        "q          pruned   of params   Δharmful   Δbenign   random Δharmful   refusal",
    ]
    rnd = {r["q"]: r for r in m["random_control"]}
    for r in m["sweep"]:
        ctrl = rnd.get(r["q"], {})
        lines.append(f"{r['q']:<9g}{r['pruned']:>9,}  {fmt_pct(r['fraction_params']):>10}  {fmt(r['d_harm'], '{:+.3f}'):>9}"
                     f"  {fmt(r['d_benign'], '{:+.3f}'):>8}  {fmt(ctrl.get('d_harm'), '{:+.3f}'):>16}"
                     f"  {fmt(r['refusal_rate'], '{:.0%}'):>8}")
    r1, t_ci = c1["smallest_selective"], {"ci": c2.get("transfer_ci")}
    lines.append(f"claim 1     {c1['verdict']}" + (f" at q={r1['q']:g}: Δharmful {fmt(r1['d_harm'], '{:+.3f}')}"
                 f"{_ci(r1, 'd_harm', '{:+.3f}')}, selectivity {fmt(r1['selectivity'], '{:.1f}')}"
                 f"{_ci(r1, 'selectivity', '{:.1f}')}" if r1 else "") + f" ({c1['rule']})")
    lines.append(f"claim 2     overlap {c2['overlap_verdict']} "
                 f"(Jaccard {fmt(c2['mean_jaccard_category_pairs'])} vs benign {fmt(c2['mean_jaccard_category_benign'])}); "
                 f"transfer {c2['transfer_verdict']} "
                 f"(diag {fmt(c2['transfer_diagonal'], '{:+.3f}')}{_ci(t_ci, 'diagonal', '{:+.3f}')}, "
                 f"off {fmt(c2['transfer_off_diagonal'], '{:+.3f}')}{_ci(t_ci, 'off_diagonal', '{:+.3f}')}, "
                 f"benign {fmt(c2['transfer_benign'], '{:+.3f}')}{_ci(t_ci, 'benign', '{:+.3f}')})")
    lines += _baseline_summary(c2)
    lines += over_refusal_summary(m.get("over_refusal"))
    lines.append(f"report      {os.path.join(run_dir, 'report.md')}  ({m['wall_seconds']:.0f} s)")
    return "\n".join(lines)


def _baseline_summary(c2) -> list[str]:
    """The summary's lines on claim 2's benign baselines (none when they were not built)."""
    b, same, matched, harm = (c2.get(k) for k in ("benign_mask", "baseline_same_q", "baseline_matched", "harm_mask"))
    lines = []
    if b:
        lines.append(f"benign mask {b['pruned']:,} weights (top q={b['q']:g}, no T_p; {fmt_pct(c2.get('benign_mask_in_retain'))} "
                     f"in T_p(retain)): Δharmful {fmt(b['d_harm'], '{:+.3f}')}  Δbenign {fmt(b['d_benign'], '{:+.3f}')}")
    if same:
        lines.append(f"baseline    {same['name']} ({same['pruned']:,} weights): Δharmful {fmt(same['d_harm'], '{:+.3f}')}"
                     f"  Δbenign {fmt(same['d_benign'], '{:+.3f}')}  Jaccard {fmt(same['jaccard_category'])}: "
                     f"overlap vs baseline {c2.get('overlap_vs_baseline_verdict', _verdict(None))}")
    if matched and harm:
        lines.append(f"matched     {matched['name']} ({matched['pruned']:,} weights): Δbenign "
                     f"{fmt(matched['d_benign'], '{:+.3f}')} vs harm {fmt(harm['d_benign'], '{:+.3f}')}, Δharmful "
                     f"{fmt(matched['d_harm'], '{:+.3f}')} vs {fmt(harm['d_harm'], '{:+.3f}')} (per unit "
                     f"{fmt(matched['per_unit'], '{:.2f}')} vs {fmt(harm['per_unit'], '{:.2f}')}"
                     f"{_ci({'ci': c2.get('distinct_ci')}, 'harm_per_unit', '{:.2f}')}): distinct "
                     f"{c2.get('distinct_verdict', _verdict(None))}")
    return lines
