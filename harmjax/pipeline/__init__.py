"""The end-to-end experiment of Orgad et al. 2026 as cached, resumable stages:
prompts -> the model's own answers -> attribution scores -> masks -> evaluation -> report.

  metrics = harmjax.pipeline.run_experiment(get_config())   # configs/embedded.py's settings
"""

from harmjax.pipeline.experiment import default_run_dir, run_experiment

__all__ = ["default_run_dir", "run_experiment"]
