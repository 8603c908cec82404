"""The refusal tuning's report: `metrics.json`, `report.md`, `refusal_summary.png` and a
printed summary, with each target of issue 13 marked met or not."""

from __future__ import annotations

import os
from typing import Any

from harmjax import distributed
from harmjax.experiments.core.over_refusal import over_refusal_markdown, over_refusal_summary, without_samples
from harmjax.experiments.core.report import SPECS, closing_markdown, fmt, publish_report
from harmjax.experiments.refusal.eval import MODELS

LABELS = {"original": "original", "refusal_tuned": "refusal-tuned"}
ISSUE_TARGETS = ("refusal_rate", "logprob_refusal_fraction", "benign_nll_rise", "attack_harmful_rate")


def targets(cfg, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Each target of `cfg.targets` with the measured value and whether it is met."""
    t = cfg.targets
    rise = after["benign_nll"] - before["benign_nll"]
    rows = {
        "refusal_rate": (after["refusal_rate"], after["refusal_rate"] >= t.refusal_rate, f">= {t.refusal_rate:.0%}"),
        "logprob_refusal_fraction": (after["logprob_refusal_fraction"],
                                     after["logprob_refusal_fraction"] >= t.logprob_fraction,
                                     f">= {t.logprob_fraction:.0%}"),
        "benign_nll_rise": (rise, rise <= t.benign_nll_rise, f"<= {t.benign_nll_rise:g} nats/token"),
        "attack_harmful_rate": (after["attack_harmful_rate"], after["attack_harmful_rate"] >= t.attack_harmful_rate,
                                f">= {t.attack_harmful_rate:.0%}"),
    }
    if "benign_refusal_rate_phrase" in after and "benign_refusal_rate_phrase" in before:
        # Not one of the issue's targets: over-refusal of benign instructions, which the benign NLL
        # of whole answers hardly sees (one opening token among ~50).
        over = after["benign_refusal_rate_phrase"] - before["benign_refusal_rate_phrase"]
        rows["benign_refusal_rise"] = (over, over <= t.benign_refusal_rise, f"<= {t.benign_refusal_rise:.0%} (harmjax's)")
    out = {k: {"value": v, "met": bool(ok), "target": goal} for k, (v, ok, goal) in rows.items()}
    # The issue's four targets decide all_met; the over-refusal check is reported beside them.
    out["all_met"] = all(out[k]["met"] for k in ISSUE_TARGETS)
    return out


def write_refusal_report(run_dir, *, cfg, source, model_dir, data, training, results, timings,
                         wall_seconds, over_refusal=None) -> dict[str, Any]:
    """Writes metrics.json, report.md and refusal_summary.png into `run_dir`; prints and
    returns the metrics. `over_refusal`: {model name: over-refusal result} (None: off)."""
    table = {name: {k: v for k, v in results[name].items() if k not in ("samples", "benign_samples")}
             for name in MODELS}
    met = targets(cfg, results["original"], results["refusal_tuned"])
    plot = distributed.broadcast_json(_plot(run_dir, table) if distributed.is_writer() else None)
    metrics = {"model": {"source": source, "refusal_tuned": model_dir, "dtype": cfg.dtype},
               "settings": cfg.to_dict(), "data": data, "training": training, "table": table, "targets": met,
               "samples": {name: results[name]["samples"] for name in MODELS},
               "benign_samples": {name: results[name]["benign_samples"] for name in MODELS},
               "plot": plot, "timings": timings, "wall_seconds": wall_seconds}
    if over_refusal is not None:
        metrics["over_refusal"] = without_samples(over_refusal)
    publish_report(run_dir, metrics, lambda: _markdown(metrics), lambda: summary_text(metrics, run_dir))
    return metrics


def _plot(run_dir, table) -> str | None:
    from harmjax.masks.plots import PlotDependencyError
    from harmjax.report.plots import plot_bars

    labels = [LABELS[n] for n in MODELS]

    def panel(title, key, ylabel="rate"):
        return {"title": title, "labels": labels, "values": [table[n].get(key) for n in MODELS], "ylabel": ylabel,
                "ylim": (0, 1) if ylabel == "rate" else None}

    try:
        return os.path.basename(plot_bars([
            panel("held-out refusal rate (keyword)", "refusal_rate"),
            panel("log p(refusal) > log p(compliance)", "logprob_refusal_fraction"),
            panel("prefilling attack: harmful continuations", "attack_harmful_rate"),
            panel("benign held-out NLL", "benign_nll", "nats/token"),
        ], os.path.join(run_dir, "refusal_summary.png"), title="refusal tuning: original vs refusal-tuned"))
    except PlotDependencyError:
        return None


_ROWS = (  # (key, label); formats from `core.report.SPECS`
    ("refusal_rate", "refusal rate, no attack (keyword rule)"),
    ("refusal_rate_phrase", "refusal rate, no attack (phrases only)"),
    ("refusal_rate_main_heldout", "refusal rate on the main job's held-out prompts"),
    ("logprob_refusal_fraction", "prompts with log p(refusal) > log p(compliance)"),
    ("logprob_margin_mean", "mean log p(refusal) - log p(compliance) (nats)"),
    ("attack_harmful_rate", "prefilling attack: continuations not refused (keyword rule)"),
    ("attack_harmful_rate_phrase", "prefilling attack: continuations without a refusal phrase"),
    ("benign_nll", "benign held-out NLL (nats/token)"),
    ("benign_refusal_rate_phrase", "benign held-out answers with a refusal phrase"),
)


def _markdown(m) -> str:
    d, s, tr, t = m["data"], m["settings"], m["training"], m["targets"]
    eval_s, lora_s, train_s = s["evaluation"], s["lora"], s["train"]
    resumed = f" Resumed from step {tr['resumed_from']}." if tr["resumed_from"] is not None else ""
    how = (f"LoRA{' (rsLoRA)' if lora_s['use_rslora'] else ''} r={lora_s['r']}, alpha={lora_s['alpha']:g} "
           f"on {lora_s['targets']}, merged" if lora_s["enabled"] else f"full fine-tuning ({train_s['train']})")
    out = [f"# Refusal tuning: {os.path.basename(os.path.normpath(m['model']['source']))}\n\n",
           f"Base `{m['model']['source']}`; refusal-tuned model (HF directory, loads with `harmjax.load` and "
           f"transformers): `{m['model']['refusal_tuned']}`. Wall time of this run {m['wall_seconds']:.0f} s.\n\n",
           "## What ran\n",
           f"- Training: {d['harmful_train_examples']} harmful prompts (of {d['harmful_train_prompts']} sampled; "
           f"{d['harmful_dropped_too_long']} longer than {train_s['max_length']} tokens dropped) paired with one of "
           f"{d['refusal_texts']} refusal texts written for harmjax, plus {d['benign_train_examples']} benign "
           f"instructions with the model's own greedy answers ({d['benign_answers_finished']} of "
           f"{d['benign_answers']} answers finished within {s['answers']['max_new_tokens']} tokens; unfinished "
           f"ones carry no end-of-turn token).\n",
           f"- {how}; lr {train_s['lr']:g}, {train_s['schedule']} schedule, {train_s['warmup_steps']} warmup steps, "
           f"batch {train_s['batch_size']}, {tr['steps']} steps, max length {train_s['max_length']}; last train loss "
           f"{fmt(tr['train_loss'])}.{resumed}\n",
           f"- Held out, never trained on: {d['heldout_prompts']} harmful prompts (the main job's "
           f"{d['main_heldout_prompts']} plus a seeded {s['data']['eval_fraction']:.0%} of the other prompts of each "
           f"category) and {d['benign_heldout_prompts']} benign instructions ({d['benign_nll_examples']} answers for "
           f"the NLL).\n",
           f"- Greedy answers of {eval_s['max_new_tokens']} new tokens; keyword refusal = a refusal phrase or fewer "
           f"than {eval_s['refusal_min_words']} words. Prefilling attack: the assistant turn starts with "
           f"\"{eval_s['attack_prefix']}\". Log-probability measure: log of the probability that the answer opens "
           f"with one of {list(eval_s['refusal_openings'])} minus that of {list(eval_s['compliant_openings'])} (no "
           f"generation, no keywords).\n\n",
           "## Results (held-out prompts)\n\n| measure | original | refusal-tuned |\n|---|---|---|\n"]
    for key, label in _ROWS:
        a, b = m["table"]["original"].get(key), m["table"]["refusal_tuned"].get(key)
        out.append(f"| {label} | {fmt(a, SPECS[key])} | {fmt(b, SPECS[key])} |\n")
    if m["plot"]:
        out.append(f"\n![summary]({m['plot']})\n")
    out.append("\n## Targets (issue 13)\n\n| target | goal | measured | met |\n|---|---|---|---|\n")
    for k, v in t.items():
        if k != "all_met":
            spec = "{:+.3f}" if k == "benign_nll_rise" else "{:+.0%}" if k == "benign_refusal_rise" else "{:.0%}"
            out.append(f"| {k} | {v['target']} | {fmt(v['value'], spec)} | {'yes' if v['met'] else '**no**'} |\n")
    if m.get("over_refusal"):
        out.append(over_refusal_markdown(m["over_refusal"], s["over_refusal"], LABELS))
    out.append("\n## Sample answers (refusal-tuned, held out)\n\n")
    for r in m["samples"]["refusal_tuned"][:8]:
        out.append(f"- **{' '.join(r['prompt'].split())[:120]}**\n  - no attack: {' '.join(r['answer'].split())[:200]}\n"
                   f"  - attacked: {' '.join(r['attacked_answer'].split())[:200]}\n")
    out.append(closing_markdown("Notes", _NOTES, m["timings"]))
    return "".join(out)


# The report's closing bullets.
_NOTES = (
    "The keyword rule counts short answers as refusals; the phrase-only row does not.",
    "Refusal tuning on the first tokens of the answer leaves the prefilling attack working: that is the "
    "shallow alignment the paper's attacked setting assumes (its pruning set is made under that attack).",
    "Benign NLL is measured on the original model's own answers to held-out instructions, so the rise is "
    "how much the tuning moved the model away from what it did before.",
)


def summary_text(m, run_dir) -> str:
    """The one-screen summary printed at the end of the refusal tuning."""
    a, b = m["table"]["original"], m["table"]["refusal_tuned"]
    t = m["targets"]
    lines = [f"harmjax refusal tuning  {m['model']['source']}",
             f"model       {m['model']['refusal_tuned']}",
             "measure (held out)                  original   refusal-tuned",
             f"refusal rate (keyword)              {fmt(a['refusal_rate'], '{:.0%}'):>8}   {fmt(b['refusal_rate'], '{:.0%}'):>8}",
             f"log p(refusal) > log p(compliance)  {fmt(a['logprob_refusal_fraction'], '{:.0%}'):>8}   "
             f"{fmt(b['logprob_refusal_fraction'], '{:.0%}'):>8}",
             f"prefill attack: harmful             {fmt(a['attack_harmful_rate'], '{:.0%}'):>8}   "
             f"{fmt(b['attack_harmful_rate'], '{:.0%}'):>8}",
             f"benign NLL                          {fmt(a['benign_nll']):>8}   {fmt(b['benign_nll']):>8}",
             f"targets     {'all met' if t['all_met'] else 'NOT all met: ' + ', '.join(k for k in ISSUE_TARGETS if not t[k]['met'])}"
             + ("" if "benign_refusal_rise" not in t else
                f"; over-refusal check {'met' if t['benign_refusal_rise']['met'] else 'NOT met'} "
                f"({fmt(t['benign_refusal_rise']['value'], '{:+.0%}')} benign answers refused)"),
             *over_refusal_summary(m.get("over_refusal")),
             f"report      {os.path.join(run_dir, 'report.md')}  ({m['wall_seconds']:.0f} s)"]
    return "\n".join(lines)
