"""The experiments of Orgad et al. 2026 as cached, resumable stages, one package each:

  main/          the paper's experiment (claims 1 and 2): run_experiment(cfg)     configs/embedded.py
  em/            emergent misalignment (claim 4): run_em_experiment(cfg)          configs/em_embedded.py
  refusal/       the refusal-tuned model: run_refusal_tuning(cfg), ensure_refusal_model(cfg)
  compression/   claim 3, two models side by side: run_compression(cfg)           configs/compression_embedded.py
  dissociation/  claim 5: run_dissociation(cfg)                                   configs/dissociation_embedded.py
  core/          what they share: the stage cache, answers, prompt sets, score units, report writing

Each experiment reads as its settings, its stages (`run`), its measures and its report. The
entry points load on first use (importing this package stays light).
"""

from __future__ import annotations

import importlib

_ENTRY_POINTS = {
    "run_experiment": "harmjax.experiments.main.run",
    "default_run_dir": "harmjax.experiments.core.stages",
    "run_em_experiment": "harmjax.experiments.em.run",
    "run_refusal_tuning": "harmjax.experiments.refusal.run",
    "ensure_refusal_model": "harmjax.experiments.refusal.run",
    "run_compression": "harmjax.experiments.compression.run",
    "run_dissociation": "harmjax.experiments.dissociation.run",
}


def __getattr__(name: str):
    if name in _ENTRY_POINTS:
        return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_ENTRY_POINTS)
