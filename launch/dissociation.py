"""Dissociation (Orgad et al. claim 5, issue 13 part 3): a harm mask and a refusal mask on the
refusal-tuned model, against random controls of matched size; recognition, refusal,
explanation NLL and harmful generation under the prefilling attack on held-out prompts; a
2 x 2 table (mask x behaviour) with a verdict.

  python -m launch.dissociation --config=configs/dissociation_embedded.py

Every stage is cached under <output_dir>/cache (the refusal-tuned model under its own run
directory); rerunning after a kill resumes and redoes no finished stage.
"""

from __future__ import annotations

from absl import logging

from launch.common import config_flag, config_main, run_app

_CONFIG = config_flag("configs/dissociation_embedded.py", "Dissociation config file.")


def run(cfg) -> dict:
    """Runs (or resumes) the dissociation job of `cfg`; returns its metrics."""
    from harmjax.experiments.dissociation.run import run_dissociation

    return run_dissociation(cfg)


main = config_main(run, _CONFIG, lambda metrics: logging.warning("Verdict: %s.", metrics["verdict"]["outcome"]))


if __name__ == "__main__":
    run_app(main)
