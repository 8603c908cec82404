"""Score generations for harmfulness, and measure NLL selectivity and utility, resumably.

  python -m launch.evaluate --config=configs/evaluate_embedded.py \
      --config.generations=runs/generate/SmolLM2-135M-Instruct-none/generations.jsonl
  python -m launch.evaluate --config=configs/evaluate_embedded.py --config.evaluators=finetuned,refusal \
      --config.finetuned.base=/models/gemma-2b --config.finetuned.adapter=/models/strongreject-15k-v1 \
      --config.finetuned.template=/models/judge_templates.json --config.generations=...
  python -m launch.evaluate --config=configs/evaluate_embedded.py --config.generations= \
      --config.mask=runs/masks/harm --config.selectivity.harmful=h.csv --config.selectivity.benign=b.csv

Writes `scores.jsonl`, `selectivity.json`, `utility.jsonl` and `metrics.json` under the output
directory; see `harmjax.evaluate.jobs` for what each holds and how a rerun resumes.
"""

from __future__ import annotations

import json
from typing import Any

from harmjax.evaluate.jobs import json_safe, run_evaluation
from launch.common import config_flag, config_main, mesh_config, run_app

_CONFIG = config_flag("configs/evaluate_embedded.py", "Job config file.")


def run(cfg) -> dict[str, Any]:
    """The whole evaluation job (`harmjax.evaluate.jobs.run_evaluation` on the config's mesh);
    returns the metrics also written to metrics.json."""
    return run_evaluation(cfg, mesh_config(cfg.mesh))


main = config_main(run, _CONFIG, lambda metrics: print(json.dumps(json_safe(metrics), indent=2)))


if __name__ == "__main__":
    run_app(main)
