"""A refusal-tuned variant of a chat model, made by harmjax (issue 13): fine-tuning on harmful
prompts paired with refusals plus benign answers, the merged model written once, and its
held-out refusal rates, log-probability measure, prefilling attack and benign NLL.

  python -m launch.refusal_tune --config=configs/refusal_embedded.py

Every stage is cached under <output_dir>/cache; rerunning after a kill resumes (training from
its last checkpoint), and a finished model is reused.
"""

from __future__ import annotations

from launch.common import config_flag, config_main, run_app

_CONFIG = config_flag("configs/refusal_embedded.py", "Refusal-tuning config file.")


def run(cfg) -> dict:
    """Makes (or reuses) the refusal-tuned model of `cfg`, measures it; returns the metrics."""
    from harmjax.experiments.refusal.run import run_refusal_tuning

    return run_refusal_tuning(cfg)


main = config_main(run, _CONFIG)


if __name__ == "__main__":
    run_app(main)
