"""Attribution scan: score a model's linear weights on a (prompt, response) set and save the scores.

  python -m launch.score --config=configs/score.py --config.data=harmful.csv --config.kind=harm

Writes <output_dir>/scores/ (orbax), scores.safetensors (HF names), summary.json. The scan
state is checkpointed in <output_dir>/scan_state every `checkpoint_every` batches: rerunning
the same command after an interruption continues where it stopped.
"""

from __future__ import annotations

import os

from absl import app, logging

import harmjax
from harmjax.attribution import scan
from harmjax.attribution.core import check_kinds
from harmjax.data.records import filter_categories, read_records, sample, to_examples
from harmjax.masks.storage import save_scores
from launch.common import checked_config, config_flag, init_runtime, mesh_config, resolve_model_source, run_app

_CONFIG = config_flag("configs/score.py", "Scan config file.")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def load_examples(cfg):
    """The configured examples: read, checked, filtered by category, seeded sample."""
    if not cfg.data:
        raise app.UsageError("Set --config.data to a .csv/.jsonl/.json file or a hub dataset name.")
    rows = read_records(cfg.data, cfg.split)
    if cfg.prefix_key:
        rows = [{**r, cfg.response_key: f"{r.get(cfg.prefix_key) or ''}{r.get(cfg.response_key) or ''}"} for r in rows]
    examples, skipped = to_examples(
        rows, cfg.prompt_key, cfg.response_key, category_key=cfg.category_key or None,
        on_bad="skip" if cfg.skip_bad_rows else "error", source=cfg.data,
    )
    if (cfg.include or cfg.exclude) and not cfg.category_key:
        raise app.UsageError("include/exclude need --config.category_key.")
    examples = filter_categories(examples, _csv(cfg.include) or None, _csv(cfg.exclude) or None)
    if not examples:
        raise app.UsageError(f"No examples left in {cfg.data} after filtering.")
    return sample(examples, cfg.nsamples if cfg.nsamples > 0 else None, cfg.seed), skipped, len(rows)


def main(argv):
    del argv
    cfg = checked_config(_CONFIG)  # a slip in the config: one line, before start-up
    check_kinds(cfg.kind)  # a kind typo too (ScoreKindError: one line naming the known kinds)
    init_runtime()
    examples, skipped, total_rows = load_examples(cfg)
    model = harmjax.load(resolve_model_source(cfg.model), dtype=cfg.dtype, mesh=mesh_config(cfg.mesh))
    out_dir = cfg.output_dir or os.path.join("runs", "scores", cfg.kind)
    os.makedirs(out_dir, exist_ok=True)
    result = scan(
        model, examples, cfg.kind, scope=_csv(cfg.scope) or None, batch_size=cfg.batch_size,
        text_format=cfg.text_format, max_length=cfg.max_length, remat=cfg.remat, layerwise=cfg.layerwise, abs_chunk=cfg.abs_chunk,
        checkpoint_dir=os.path.join(out_dir, "scan_state"), checkpoint_every=cfg.checkpoint_every,
    )
    summary = {
        "model": cfg.model, "model_dir": model.source_dir, "model_type": model.config.model_type,
        "data": cfg.data, "nsamples": len(examples), "rows_read": total_rows, "rows_skipped": skipped,
        "seed": cfg.seed, "kind": cfg.kind, "text_format": cfg.text_format, "max_length": cfg.max_length,
        "batch_size": cfg.batch_size, "include": cfg.include, "exclude": cfg.exclude,
        "scope": _csv(cfg.scope) or "default", "tokens": result.num_tokens, "mean_loss": result.mean_loss,
        "scan_seconds": result.seconds, "resumed_from_batch": result.resumed_from,
        "num_params": model.num_params(),
    }
    save_scores(out_dir, result.scores, summary)
    print(f"{cfg.kind} scores of {len(examples)} examples ({result.num_tokens} tokens, mean response NLL "
          f"{result.mean_loss:.3f}) written to {out_dir} in {result.seconds:.1f} s")
    logging.info("Scores saved to %s", out_dir)


if __name__ == "__main__":
    run_app(main)
