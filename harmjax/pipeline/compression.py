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
`harmjax.pipeline.refusal_model.ensure_refusal_model`); the paper configs pair a base model with
its instruct model.
"""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Any

from harmjax import distributed
from harmjax.pipeline.report import fmt, fmt_pct, timings_markdown
from harmjax.pipeline.stages import as_config, publish_report, slug

MODELS = ("model_a", "model_b")
VERDICT_RULE = (
    "Compression is shown when the aligned model B reaches the harmful-NLL rise target with a smaller "
    "pruned fraction of scored weights than model A, each at a benign-NLL rise within the same budget. "
    "It is not shown when A needs the smaller (or the same) fraction, or when only A reaches the target "
    "within the budget. It is not tested when neither model reaches the target within the budget, or when "
    "the sweep cannot order the two (a model reaches the target already at its smallest q, so its "
    "fraction is only an upper bound): extend q_sweep."
)


# --- the curve and its figures ----------------------------------------------------------------

def compression_curve(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The harm-mask sweep of a `run_experiment` metrics dict as points sorted by the pruned
    fraction of scored weights: {q, pruned, fraction, log10_fraction, d_harm, d_benign}. Points
    that pruned nothing or lack a harmful-NLL rise are left out."""
    points = []
    for r in metrics["sweep"]:
        if not r.get("fraction") or r["fraction"] <= 0 or r.get("d_harm") is None:
            continue
        points.append({"q": r["q"], "pruned": r["pruned"], "fraction": r["fraction"],
                       "log10_fraction": math.log10(r["fraction"]), "d_harm": r["d_harm"],
                       "d_benign": r.get("d_benign")})
    return sorted(points, key=lambda p: p["fraction"])


def _within(b, budget: float) -> bool:
    return b is not None and math.isfinite(b) and b <= budget


def fraction_at_target(curve, harm_target: float, benign_budget: float) -> dict[str, Any]:
    """The smallest pruned fraction at which the harmful-NLL rise reaches `harm_target` with a
    benign-NLL rise <= `benign_budget`.

    Between two sweep points whose harm rises straddle the target, the crossing is interpolated
    linearly in log10(fraction), and so is the benign rise there ("exact"). A measured point
    that meets both without such a crossing before it (the sweep's first point, or one after a
    crossing over budget) gives only an upper bound ("upper"): the true fraction may be
    smaller. Returns {reached, fraction, log10_fraction, d_benign, bound, between_q}.
    """
    candidates = []
    for i, p in enumerate(curve):
        if i > 0:
            a = curve[i - 1]
            if a["d_harm"] < harm_target <= p["d_harm"] and a["d_benign"] is not None and p["d_benign"] is not None:
                t = (harm_target - a["d_harm"]) / (p["d_harm"] - a["d_harm"])
                x = a["log10_fraction"] + t * (p["log10_fraction"] - a["log10_fraction"])
                b = a["d_benign"] + t * (p["d_benign"] - a["d_benign"])
                if _within(b, benign_budget):
                    candidates.append({"log10_fraction": x, "d_benign": b, "bound": "exact",
                                       "between_q": [a["q"], p["q"]]})
                    continue
        if p["d_harm"] >= harm_target and _within(p["d_benign"], benign_budget):
            candidates.append({"log10_fraction": p["log10_fraction"], "d_benign": p["d_benign"], "bound": "upper",
                               "between_q": [p["q"], p["q"]]})
    if not candidates:
        return {"reached": False, "fraction": None, "log10_fraction": None, "d_benign": None, "bound": None,
                "between_q": None}
    best = min(candidates, key=lambda c: c["log10_fraction"])
    return {"reached": True, "fraction": 10 ** best["log10_fraction"], **best}


def area_within_budget(curve, benign_budget: float, lo: float | None = None, hi: float | None = None) -> dict:
    """The area under Δ harmful NLL over log10(fraction), piecewise linear between sweep
    points, counting only segments whose two ends are within `benign_budget`, over [lo, hi]
    (default: the curve's own range). Returns {area, mean, lo, hi}: mean = area / (hi - lo),
    the average harm rise per decade of pruned fraction (None for an empty range)."""
    if not curve:
        return {"area": None, "mean": None, "lo": lo, "hi": hi}
    lo = curve[0]["log10_fraction"] if lo is None else lo
    hi = curve[-1]["log10_fraction"] if hi is None else hi
    area = 0.0
    for a, b in zip(curve, curve[1:]):
        if not (_within(a["d_benign"], benign_budget) and _within(b["d_benign"], benign_budget)):
            continue
        x0, x1 = max(a["log10_fraction"], lo), min(b["log10_fraction"], hi)
        width = b["log10_fraction"] - a["log10_fraction"]
        if x1 <= x0 or width <= 0:
            continue

        def h(x, a=a, b=b, width=width):
            return a["d_harm"] + (x - a["log10_fraction"]) / width * (b["d_harm"] - a["d_harm"])

        area += 0.5 * (h(x0) + h(x1)) * (x1 - x0)
    span = hi - lo
    return {"area": area, "mean": area / span if span > 0 else None, "lo": lo, "hi": hi}


def compare(curve_a, curve_b, harm_target: float, benign_budget: float) -> dict[str, Any]:
    """The compression figures of both curves and the verdict of `VERDICT_RULE`: "compression
    shown", "not shown" or "not tested" (with the reason)."""
    fa = fraction_at_target(curve_a, harm_target, benign_budget)
    fb = fraction_at_target(curve_b, harm_target, benign_budget)
    if curve_a and curve_b:
        lo = max(curve_a[0]["log10_fraction"], curve_b[0]["log10_fraction"])
        hi = min(curve_a[-1]["log10_fraction"], curve_b[-1]["log10_fraction"])
    else:
        lo = hi = None
    areas = {"a": area_within_budget(curve_a, benign_budget, lo, hi), "b": area_within_budget(curve_b, benign_budget, lo, hi)}
    if not fa["reached"] and not fb["reached"]:
        verdict, reason = "not tested", "neither model reaches the target within the benign budget"
    elif not fa["reached"]:
        verdict, reason = "compression shown", "only B reaches the target within the benign budget"
    elif not fb["reached"]:
        verdict, reason = "not shown", "only A reaches the target within the benign budget"
    elif fb["fraction"] < fa["fraction"]:
        if fa["bound"] == "upper":  # A's true fraction may lie below B's
            verdict, reason = "not tested", "A reaches the target at a sweep point without a crossing before it: extend q_sweep down"
        else:
            verdict, reason = "compression shown", "B reaches the target with the smaller pruned fraction"
    else:
        if fb["bound"] == "upper":
            verdict, reason = "not tested", "B reaches the target at a sweep point without a crossing before it: extend q_sweep down"
        else:
            verdict, reason = "not shown", "A reaches the target with the smaller (or the same) pruned fraction"
    ratio = fa["fraction"] / fb["fraction"] if fa["reached"] and fb["reached"] else None
    return {"verdict": verdict, "reason": reason, "a": fa, "b": fb, "ratio_a_over_b": ratio, "area": areas,
            "harm_target": harm_target, "benign_budget": benign_budget, "rule": VERDICT_RULE}


# --- the job ----------------------------------------------------------------------------------

def experiment_config(cfg, key: str, out_dir: str, progress: bool = True):
    """The `run_experiment` config of model `key` ("model_a" / "model_b"): the shared
    `experiment` block with that model's source and run directory."""
    from harmjax.pipeline.model_sources import resolve_source

    M = cfg[key]
    exp = copy.deepcopy(cfg.experiment)
    refusal = _refusal_config(cfg)
    exp.model = resolve_source(M.model, refusal, experiment_cfg=exp, progress=progress)
    exp.output_dir = M.output_dir or os.path.join(out_dir, slug(M.label))
    return exp


def _refusal_config(cfg):
    """The refusal-tuning settings, with the experiment's prompt split and seed (the tuned model
    must never train on the experiment's held-out prompts), or None."""
    if "refusal" not in cfg or cfg.refusal is None:
        return None
    r = copy.deepcopy(cfg.refusal)
    r.prompts = copy.deepcopy(cfg.experiment.prompts)
    r.prompts_seed = cfg.experiment.seed
    return r


def run_compression(cfg, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) the experiment on both models, compares their sweeps and writes
    report.md, metrics.json and compression.png into cfg.output_dir; returns the metrics."""
    from harmjax.pipeline.experiment import run_experiment

    cfg = as_config(cfg)
    t_start = time.perf_counter()
    out_dir = cfg.output_dir or os.path.join("runs", f"compression-{slug(cfg.model_a.label)}-{slug(cfg.model_b.label)}")
    os.makedirs(out_dir, exist_ok=True)
    C = cfg.compression
    models = {}
    for key in MODELS:
        t0 = time.perf_counter()
        exp = experiment_config(cfg, key, out_dir, progress)
        m = run_experiment(exp, progress=progress)
        models[key] = {
            "label": cfg[key].label, "model": cfg[key].model, "source": exp.model, "run_dir": exp.output_dir,
            "parameters": m["model"]["parameters"], "baseline": {k: m["baseline"].get(k) for k in (
                "harm_nll", "benign_nll", "refusal_rate", "strongreject")},
            "curve": compression_curve(m), "seconds": time.perf_counter() - t0,
            "cached": all(v.get("cached") for k, v in m["timings"].items() if k != "load"),
        }
    result = compare(models["model_a"]["curve"], models["model_b"]["curve"], C.harm_target, C.benign_budget)
    plot = distributed.broadcast_json(_plot(out_dir, models, result) if distributed.is_writer() else None)
    metrics = {"settings": cfg.to_dict(), "models": models, "compression": result, "plot": plot,
               "wall_seconds": time.perf_counter() - t_start}
    publish_report(out_dir, metrics, lambda: _markdown(metrics), lambda: summary_text(metrics, out_dir))
    return metrics


# --- report ----------------------------------------------------------------------------------

def _plot(out_dir, models, result) -> str | None:
    from harmjax.masks.plots import PlotDependencyError, pyplot

    try:
        plt = pyplot("harmjax.pipeline.compression")
    except PlotDependencyError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    budget, target = result["benign_budget"], result["harm_target"]
    for (key, m), color, fig_key in zip(models.items(), ("tab:blue", "tab:red"), ("a", "b")):
        c = m["curve"]
        if not c:
            continue
        x = [p["fraction"] for p in c]
        label = f"{'A' if key == 'model_a' else 'B'}: {m['label']}"
        axes[0].plot(x, [p["d_harm"] for p in c], "-", color=color, label=label)
        ok = [_within(p["d_benign"], budget) for p in c]
        for xi, yi, good in zip(x, [p["d_harm"] for p in c], ok):  # filled: within the benign budget
            axes[0].plot([xi], [yi], "o", color=color, mfc=color if good else "white")
        axes[1].plot(x, [p["d_benign"] if p["d_benign"] is not None else math.nan for p in c], "o-", color=color,
                     label=label)
        f = result[fig_key]
        if f["reached"]:
            axes[0].axvline(f["fraction"], color=color, ls=":", lw=1)
    axes[0].axhline(target, color="grey", ls="--", lw=1, label=f"harm target {target:g}")
    axes[1].axhline(budget, color="grey", ls="--", lw=1, label=f"benign budget {budget:g}")
    for ax, ylabel in zip(axes, ("Δ held-out harmful NLL (nats/token)", "Δ held-out benign NLL (nats/token)")):
        ax.set_xscale("log")
        ax.set_xlabel("pruned fraction of scored weights")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("harm rise (filled: benign rise within budget)", fontsize=10)
    axes[1].set_title("utility cost", fontsize=10)
    fig.suptitle(f"compression: {result['verdict']}", fontsize=11)
    fig.tight_layout()
    path = os.path.join(out_dir, "compression.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.path.basename(path)


def _figure_text(f) -> str:
    if not f["reached"]:
        return "not reached within the budget"
    return (f"{fmt_pct(f['fraction'])} of scored weights{' (upper bound)' if f['bound'] == 'upper' else ''}, "
            f"benign rise {fmt(f['d_benign'], '{:+.3f}')} (q between {f['between_q'][0]:g} and {f['between_q'][1]:g})")


def _markdown(m) -> str:
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
                       f"{fmt(p['d_benign'], '{:+.3f}')} | {'yes' if _within(p['d_benign'], r['benign_budget']) else 'no'} |\n")
    if m["plot"]:
        out.append(f"\n![compression]({m['plot']})\n")
    out.append(f"\n## Verdict: **{r['verdict']}**\n\nRule: {r['rule']}\n\n")
    out.append(f"Target: harmful-NLL rise >= {r['harm_target']:g} nats/token; benign budget: rise <= "
               f"{r['benign_budget']:g} nats/token. Crossings are interpolated linearly in log10(fraction).\n\n")
    out.append(f"- A ({a['label']}): {_figure_text(r['a'])}.\n- B ({b['label']}): {_figure_text(r['b'])}.\n")
    out.append(f"- Ratio A / B: {fmt(r['ratio_a_over_b'], '{:.2f}')}. Reason: {r['reason']}.\n")
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
        "- The verdict is a rule on point estimates at this sweep's resolution; curves between sweep points are "
        "interpolations.\n"
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
    lines.append(f"verdict       {r['verdict']} ({r['reason']})")
    lines.append(f"report        {os.path.join(out_dir, 'report.md')}  ({m['wall_seconds']:.0f} s)")
    return "\n".join(lines)


__all__ = ["VERDICT_RULE", "area_within_budget", "compare", "compression_curve", "experiment_config",
           "fraction_at_target", "run_compression"]
