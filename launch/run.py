"""The main job: the paper's experiment end to end (prompts, the model's own answers, scores,
masks over a q sweep with random controls, per-category masks, evaluation, report).

  python -m launch.run --config=configs/embedded.py
  python -m launch.run --config=configs/llama31_8b_instruct.py --config.output_dir=runs/llama8b

Every stage is cached under <output_dir>/cache; rerunning after a kill (or with changed
settings) redoes only what is unfinished (or affected).
"""

from __future__ import annotations

from launch.common import config_flag, config_main, run_app

_CONFIG = config_flag("configs/embedded.py", "Experiment config file.")


def run(cfg) -> dict:
    """Runs the experiment of `cfg` and returns its metrics (report in cfg.output_dir)."""
    from harmjax.experiments import run_experiment

    return run_experiment(cfg)


main = config_main(run, _CONFIG)


if __name__ == "__main__":
    run_app(main)
