"""Claim 3 (alignment compresses the harm mechanism): the experiment on a less aligned model A
and an aligned model B side by side, the compression figure of each and a verdict.

  python -m launch.compression --config=configs/compression_embedded.py
  python -m launch.compression --config=configs/compression_embedded.py \
      --config.model_a.output_dir=runs/experiment-SmolLM2-135M-Instruct   # reuse the main job's run
  python -m launch.compression --config=configs/compression_llama31_8b.py

Each model's experiment is cached under its own run directory; rerunning after a kill redoes
only unfinished stages (the refusal-tuned model of the embedded default is made once).
"""

from __future__ import annotations

from launch.common import config_flag, config_main, run_app

_CONFIG = config_flag("configs/compression_embedded.py", "Compression config file.")


def run(cfg) -> dict:
    """Runs the compression comparison of `cfg`; returns its metrics (report in cfg.output_dir)."""
    from harmjax.experiments.compression.run import run_compression

    return run_compression(cfg)


main = config_main(run, _CONFIG)


if __name__ == "__main__":
    run_app(main)
