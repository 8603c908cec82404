"""The main job. For now: fetch and convert the model, load it sharded, print a summary.

  python -m launch.run --config=configs/embedded.py
  python -m launch.run --config=configs/embedded.py --config.dtype=bfloat16
"""

from __future__ import annotations

import json
import os
import time

from absl import app, logging

import harmjax
from harmjax.model_summary import format_summary, summarize
from launch.common import config_flag, init_runtime, mesh_config, resolve_model_source

_CONFIG = config_flag("configs/embedded.py", "Job config file.")


def main(argv):
    del argv
    init_runtime()
    cfg = _CONFIG.value
    start = time.perf_counter()
    source = resolve_model_source(cfg.model)
    assets_done = time.perf_counter()
    model = harmjax.load(source, dtype=cfg.dtype, mesh=mesh_config(cfg.mesh))
    loaded = time.perf_counter()
    summary = summarize(model, cfg.sentences, cfg.batch_size, cfg.max_length)
    summary.update(
        asset_seconds=assets_done - start,
        load_seconds=loaded - assets_done,
        wall_seconds=time.perf_counter() - start,
    )
    out_dir = cfg.output_dir or os.path.join("runs", os.path.basename(os.path.normpath(model.source_dir)))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(format_summary(summary))
    logging.info("Summary written to %s", os.path.join(out_dir, "summary.json"))


if __name__ == "__main__":
    app.run(main)
