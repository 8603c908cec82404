"""Over-refusal in the experiments: the prompts an `over_refusal` settings block selects, one
cached unit per model or mask, and the report section (main and refusal experiments alike).

The block (configs/embedded.py, configs/refusal_embedded.py and the paper configs):
  enabled         False skips the measure (and its report section)
  path            "" = harmjax's set (package data), or a JSONL of the same form
  safe_per_kind   safe prompts per kind, a seeded subset with their unsafe contrasts (0 = all)
  max_new_tokens  greedy answer length; a refusal shows in its first words
  batch_size      prompts per generation batch
  masks           main experiment only: "headline" (unpruned, the headline harm mask and its
                  random control) or "all" (every mask the experiment evaluates)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from harmjax.experiments.core.report import fmt
from harmjax.experiments.core.stages import read_json, write_json_atomic


def over_refusal_prompts(block, seed: int) -> list:
    """The prompts of an `over_refusal` settings block (see the module docstring)."""
    from harmjax.data.over_refusal_set import load_over_refusal, over_refusal_subset

    return over_refusal_subset(load_over_refusal(block.path or None), block.safe_per_kind, seed)


def _unit(d: str, name: str) -> str:
    return os.path.join(d, f"{name.replace(' ', '_').replace('=', '')}.json")


def over_refusal_units(d: str, named_params: Mapping[str, Callable[[], Any]], get_model: Callable[[], Any], prompts,
                       block) -> dict[str, Any]:
    """{name: `measure_over_refusal` result} for each (name, params factory), each written to
    `<d>/<name>.json` and read back from there on a rerun (a killed stage keeps its finished
    units). The model (`get_model()`) and params are built only for units not yet on disk, so a
    cached run loads nothing."""
    from harmjax.evaluate.over_refusal import measure_over_refusal

    out = {}
    for name, make_params in named_params.items():
        unit = _unit(d, name)
        if not os.path.isfile(unit):
            write_json_atomic(unit, measure_over_refusal(get_model(), make_params(), prompts,
                                                         max_new_tokens=block.max_new_tokens,
                                                         batch_size=block.batch_size))
        out[name] = read_json(unit)
    return out


def _rate(s: Mapping[str, Any]) -> str:
    if not s or not s.get("n"):
        return "n/a"
    return f"{fmt(s['rate'], '{:.0%}')} ({s['k']}/{s['n']}; 95% CI {fmt(s['ci_low'], '{:.0%}')}-{fmt(s['ci_high'], '{:.0%}')})"


def over_refusal_markdown(results: Mapping[str, Mapping[str, Any]], block, labels: Mapping[str, str] | None = None) -> str:
    """The report section: over-refusal and contrast refusal per model, then per kind."""
    if not results:
        return ""
    labels = labels or {}
    names = list(results)
    first = results[names[0]]
    out = ["\n## Over-refusal (harmless prompts that only sound harmful)\n\n",
           f"{first['over_refusal']['n']} safe prompts and {first['unsafe_refusal']['n']} unsafe contrasts of the "
           "same surface form, from harmjax's XSTest-style set (`harmjax/data/over_refusal`"
           + (f", {block['safe_per_kind']} safe prompts per kind" if block['safe_per_kind'] else "") + f"); greedy answers "
           f"of {block['max_new_tokens']} new tokens; a refusal is an answer with a refusal or apology phrase "
           "(`harmjax.evaluate.over_refusal`). Over-refusal = refused safe prompts / safe prompts (Wilson 95% "
           "interval); a model that refuses everything also refuses every contrast.\n\n",
           "| model | over-refusal (safe prompts refused) | unsafe contrasts refused |\n|---|---|---|\n"]
    for n in names:
        r = results[n]
        out.append(f"| {labels.get(n, n)} | {_rate(r['over_refusal'])} | {_rate(r['unsafe_refusal'])} |\n")
    kinds = list(first["per_kind"])
    out.append("\nPer kind, safe / unsafe refused:\n\n| kind | " + " | ".join(labels.get(n, n) for n in names)
               + " |\n" + "|---" * (len(names) + 1) + "|\n")
    for k in kinds:
        cells = [f"{fmt(results[n]['per_kind'][k]['safe'], '{:.0%}')} / {fmt(results[n]['per_kind'][k]['unsafe'], '{:.0%}')}"
                 for n in names]
        out.append(f"| {k} | " + " | ".join(cells) + " |\n")
    return "".join(out)


def over_refusal_summary(results: Mapping[str, Mapping[str, Any]] | None) -> list[str]:
    """The printed summary's line: each model's over-refusal and contrast refusal rates."""
    if not results:
        return []
    return ["over-refusal " + ", ".join(f"{n} {fmt(r['over_refusal']['rate'], '{:.0%}')} (unsafe "
                                        f"{fmt(r['unsafe_refusal']['rate'], '{:.0%}')})" for n, r in results.items())]


def without_samples(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The results for metrics.json's table: the rates, without the per-prompt samples."""
    return {n: {k: v for k, v in r.items() if k != "samples"} for n, r in results.items()}


__all__ = ["over_refusal_markdown", "over_refusal_prompts", "over_refusal_summary", "over_refusal_units",
           "without_samples"]
