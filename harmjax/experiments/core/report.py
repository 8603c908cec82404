"""Report writing shared by every experiment: metrics.json and report.md written once (by
process 0), the printed summary, and the number formats (one per measure, so a measure reads the same in every report), the
timings list and the closing sections of the reports."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from harmjax import distributed
from harmjax.experiments.core.stages import write_json_atomic


def publish_report(run_dir: str, metrics: Mapping[str, Any], markdown: Callable[[], str],
                   summary: Callable[[], str] | None = None) -> None:
    """The end of every experiment: metrics.json (atomic), then process 0 writes report.md and
    prints the one-screen summary (built only there), and every process waits for it."""
    write_json_atomic(os.path.join(run_dir, "metrics.json"), metrics)
    if distributed.is_writer():
        with open(os.path.join(run_dir, "report.md"), "w") as f:
            f.write(markdown())
        if summary is not None:
            print(summary())
    distributed.barrier(f"report {run_dir}")


def fmt(x: Any, spec: str = "{:.3f}") -> str:
    """`x` formatted with `spec`, or "n/a" for None and non-finite floats (report tables)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return spec.format(x)


def fmt_pct(x: Any) -> str:
    """A fraction as a percentage with 4 significant digits, or "n/a"."""
    return "n/a" if x is None else f"{100 * x:.4g}%"


def timings_markdown(timings) -> str:
    """The report's "Timings" list: one line per stage, cached ones marked with the time they
    took when computed, and the devices' peak memory by then where measured."""
    def line(k, v):
        text = f"- {k}: {v['seconds']:.1f} s"
        if v.get("cached"):
            text += f" (cached{', computed in %.1f s' % v['computed_seconds'] if 'computed_seconds' in v else ''})"
        peak = v.get("peak_device_gib", v.get("computed_peak_device_gib"))
        return text + (f", peak device memory {peak:.1f} GiB so far" if peak is not None else "") + "\n"

    return "".join(line(k, v) for k, v in timings.items())

PERCENT, NLL, SIGNED = "{:.0%}", "{:.3f}", "{:+.2f}"

# Format strings for `core.report.fmt`, by measure key.
SPECS = {
    # Fractions of prompts or answers.
    "refusal_rate": PERCENT,
    "refusal_rate_phrase": PERCENT,
    "refusal_rate_main_heldout": PERCENT,
    "logprob_refusal_fraction": PERCENT,
    "attack_harmful_rate": PERCENT,
    "attack_harmful_rate_phrase": PERCENT,
    "benign_refusal_rate_phrase": PERCENT,
    # Mean NLLs (nats/token), and an AUROC on the same three decimals.
    "harm_nll": NLL,
    "explanation_nll": NLL,
    "benign_nll": NLL,
    "recognition_auroc": NLL,
    # Signed log-probability differences (nats).
    "logprob_margin_mean": SIGNED,
    "recognition_separation": SIGNED,
}


def closing_markdown(heading: str, notes: Iterable[str], timings: Mapping[str, Any]) -> str:
    """The end of a report: a `heading` section with one bullet per note, then the timings."""
    bullets = "".join(f"- {note}\n" for note in notes)
    return f"\n## {heading}\n\n{bullets}\n## Timings\n\n" + timings_markdown(timings)
