"""The old name of `harmjax.experiments`, kept so that code written against it runs:

  metrics = harmjax.pipeline.run_experiment(get_config())   # = harmjax.experiments.run_experiment

`run_experiment` and `default_run_dir` load on first use; new code imports from
`harmjax.experiments`.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("run_experiment", "default_run_dir"):
        import harmjax.experiments

        return getattr(harmjax.experiments, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["default_run_dir", "run_experiment"]
