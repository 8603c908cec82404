"""Report writing shared by every experiment: metrics.json and report.md written once (by
process 0), the printed summary, and the number formats and timings list of the reports."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
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
