"""Claim 3's report: report.md and the printed summary."""

from __future__ import annotations

import os

from harmjax.evaluate.bootstrap import fmt_interval
from harmjax.experiments.compression.measures import within
from harmjax.experiments.core.report import fmt, fmt_pct, timings_markdown


def _figure_text(f) -> str:
    if not f["reached"]:
        return "not reached within the budget"
    return (f"{fmt_pct(f['fraction'])} of scored weights{' (upper bound)' if f['bound'] == 'upper' else ''}, "
            f"benign rise {fmt(f['d_benign'], '{:+.3f}')} (q between {f['between_q'][0]:g} and {f['between_q'][1]:g})")


def _ratio_text(r) -> str:
    """The ratio A / B with its bootstrap interval, e.g. "1.59x [0.90, 2.80]"."""
    text = "n/a" if r["ratio_a_over_b"] is None else f"{r['ratio_a_over_b']:.2f}x"
    return text + fmt_interval((r.get("bootstrap") or {}).get("ratio_ci"), "{:.2f}")


def markdown(m) -> str:
    """report.md of the compression job's metrics."""
    r, s = m["compression"], m["settings"]
    a, b = m["models"]["model_a"], m["models"]["model_b"]
    out = [f"# harmjax compression (claim 3): {a['label']} vs {b['label']}\n\n"]
    out.append(f"Wall time {m['wall_seconds']:.0f} s.\n\n## What ran\n")
    for tag, x in (("A", a), ("B", b)):
        out.append(f"- Model {tag} ({x['label']}): `{x['source']}` ({x['parameters']:,} parameters); the experiment "
                   f"in `{x['run_dir']}` ({'all stages cached' if x['cached'] else 'ran'}, {x['seconds']:.0f} s). "
                   f"Unpruned: harmful NLL {fmt(x['baseline']['harm_nll'])}, benign NLL {fmt(x['baseline']['benign_nll'])}, "
                   f"refusal rate {fmt(x['baseline']['refusal_rate'], '{:.0%}')}.\n")
    e = s["experiment"]
    out.append(f"- Both: the same prompts, split and settings (seed {e['seed']}); each model's own answers; masks "
               f"T_q \\ T_p per {e['masks']['granularity']} with p={e['masks']['p']:g}, q in {list(e['masks']['q_sweep'])}; "
               f"harm = rise of the held-out harmful-answer NLL, utility cost = rise of the held-out benign-answer NLL.\n\n")
    out.append("## Curves\n\n| model | q | pruned | fraction of scored | Δ harmful | Δ benign | within budget |\n"
               "|---|---|---|---|---|---|---|\n")
    for tag, x in (("A", a), ("B", b)):
        for p in x["curve"]:
            out.append(f"| {tag} | {p['q']:g} | {p['pruned']:,} | {fmt_pct(p['fraction'])} | {fmt(p['d_harm'], '{:+.3f}')} | "
                       f"{fmt(p['d_benign'], '{:+.3f}')} | {'yes' if within(p['d_benign'], r['benign_budget']) else 'no'} |\n")
    if m["plot"]:
        out.append(f"\n![compression]({m['plot']})\n")
    out.append(f"\n## Verdict: **{r['verdict']}**\n\nRule: {r['rule']}\n\n")
    out.append(f"Target: harmful-NLL rise >= {r['harm_target']:g} nats/token; benign budget: rise <= "
               f"{r['benign_budget']:g} nats/token. Crossings are interpolated linearly in log10(fraction).\n\n")
    out.append(f"- A ({a['label']}): {_figure_text(r['a'])}.\n- B ({b['label']}): {_figure_text(r['b'])}.\n")
    boot = r.get("bootstrap") or {}
    out.append(f"- Ratio A / B: {_ratio_text(r)}. Reason: {r['reason']}.\n")
    if boot:
        out.append(f"- Interval: {boot['rule']}; per resample the ratio is inf when only B reaches the target, 0 when "
                   f"only A does, 1 when neither (A reached it in {boot['share_reached']['a']:.0%} of the resamples, "
                   f"B in {boot['share_reached']['b']:.0%}).\n")
    ar = r["area"]
    if ar["a"]["lo"] is not None and ar["a"]["hi"] is not None and ar["a"]["hi"] > ar["a"]["lo"]:
        out.append(f"- Area under Δ harmful over log10(fraction), on segments within the budget, over the common range "
                   f"[{10 ** ar['a']['lo']:.3g}, {10 ** ar['a']['hi']:.3g}]: A {fmt(ar['a']['area'])}, B "
                   f"{fmt(ar['b']['area'])} nats/token x decades (mean rise per decade A {fmt(ar['a']['mean'])}, "
                   f"B {fmt(ar['b']['mean'])}; larger = more harm removed at the same pruned fraction and budget).\n")
    out.append(
        "\n## What this run can and cannot show\n\n"
        "- Harm is a likelihood proxy (each model's own harmful answers to held-out prompts), not a judged score; "
        "the models answer differently, so the two curves measure the loss of each model's own harmful text.\n"
        "- The verdict is a rule at this sweep's resolution (curves between sweep points are interpolations); its "
        "interval resamples the held-out answers of each model, not the pruning data or the sweep's q's.\n"
        "- On the embedded default, B is SmolLM2-135M-Instruct after harmjax's own LoRA refusal tuning, not a "
        "checkpoint aligned by its makers; the paper's pairs are configs/compression_llama31_8b.py and "
        "configs/compression_qwen25_7b.py.\n")
    out.append("\n## Timings\n\n" + timings_markdown({x["label"]: {"seconds": x["seconds"], "cached": x["cached"]}
                                                      for x in (a, b)}))
    return "".join(out)


def summary_text(m, out_dir) -> str:
    """The one-screen summary printed at the end of the compression job."""
    r = m["compression"]
    lines = ["harmjax compression (claim 3)"]
    for tag, key in (("A", "model_a"), ("B", "model_b")):
        x = m["models"][key]
        pts = ", ".join(f"{fmt_pct(p['fraction'])}: {fmt(p['d_harm'], '{:+.2f}')}/{fmt(p['d_benign'], '{:+.2f}')}"
                        for p in x["curve"])
        lines.append(f"{tag} {x['label']:<16} {pts}")
        lines.append(f"  at target     {_figure_text(r[tag.lower()])}")
    lines.append(f"ratio A / B   {_ratio_text(r)}")
    lines.append(f"verdict       {r['verdict']} ({r['reason']})")
    lines.append(f"report        {os.path.join(out_dir, 'report.md')}  ({m['wall_seconds']:.0f} s)")
    return "\n".join(lines)
