"""The baselines comparison: per model, the harm mask, the refusal-direction
ablation (with activation addition as the refusal-inducing check), Wanda- and magnitude-based
set-difference masks and a random mask at the harm mask's pruned count, side by side on
harmful NLL under the prefilling attack, refusal, benign NLL, recognition and over-refusal,
with bootstrap intervals and a reading per intervention.

  python -m launch.baselines --config=configs/baselines_embedded.py

Every stage is cached under <output_dir>/<model label>/cache; the prompt and answer stages are
served from the dissociation job's run directory when it computed them under the same settings.
"""

from __future__ import annotations

from absl import logging

from launch.common import config_flag, config_main, run_app

_CONFIG = config_flag("configs/baselines_embedded.py", "Baselines comparison config file.")


def run(cfg) -> dict:
    """Runs (or resumes) the comparison of `cfg`; returns its metrics."""
    from harmjax.experiments.baselines.run import run_baselines

    return run_baselines(cfg)


def _log(metrics) -> None:
    for label, m in metrics["models"].items():
        logging.warning("%s: %s.", label, ", ".join(f"{n} {r['reading']}" for n, r in m["readings"].items()))


main = config_main(run, _CONFIG, _log)


if __name__ == "__main__":
    run_app(main)
