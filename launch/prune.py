"""Select a pruning mask from score directories (dense, from launch/score.py, or the
experiment's score candidates), or intersect mask directories; write a mask
directory (mask_indices.safetensors: sparse, HF-named; summary.json; with --config.dense_copy
also the dense uint8 mask.safetensors) and print the counts per layer and projection.

  python -m launch.prune --config=configs/prune.py --config.harm_scores=runs/harm \
      --config.retain_scores=runs/retain --config.output_dir=runs/mask
  python -m launch.prune --config=configs/prune.py --config.intersect="('runs/a','runs/b')"
"""

from __future__ import annotations

import os

from absl import app, logging

from harmjax.errors import HarmjaxError
from harmjax.masks import (
    format_counts, intersect_all, load_candidates, load_mask, load_scores, mask_from_indices, read_summary, save_mask,
    select, select_indices,
)
from harmjax.masks.storage import has_candidates
from launch.common import checked_config, config_flag, init_runtime, mesh_config, resolve_model_source, run_app

_CONFIG = config_flag("configs/prune.py", "Prune job config file.")


def model_layout(source: str, mesh_cfg):
    """(param shardings, parameter count) of the model named by `source`, from its config.json
    alone (no weights read); (None, None) with a warning when it cannot be resolved."""
    if not source:
        return None, None
    try:
        from harmjax.config import ModelConfig, hf_config_from_dict
        from harmjax.io import hf as hf_io
        from harmjax.model.param_specs import num_params
        from harmjax.sharding import make_mesh, param_shardings

        path = hf_io.resolve_checkpoint(resolve_model_source(source))
        if path.endswith(".gguf"):
            from harmjax.loading import gguf_as_hf_dir

            path = gguf_as_hf_dir(path)
        config = ModelConfig.from_hf(hf_config_from_dict(hf_io.read_config_json(path)))
        return param_shardings(config, make_mesh(mesh_config(mesh_cfg), model_config=config)), num_params(config)
    except (HarmjaxError, OSError) as e:
        logging.warning("Cannot read the model config of %r (%s); scores stay on the default "
                        "device and the fraction of all parameters is not reported.", source, e)
        return None, None


def _intersect(cfg):
    masks, summaries = zip(*(load_mask(d) for d in cfg.intersect))
    summary = {
        "method": "intersect",
        "sources": list(cfg.intersect),
        "model": summaries[0].get("model"),
        "source_summaries": [{k: v for k, v in s.items() if k != "counts"} for s in summaries],
    }
    num_params = summaries[0].get("counts", {}).get("num_params")
    return intersect_all(masks), summary, num_params


def _select_from_candidates(cfg, shardings):
    """The mask from score candidates (the experiment's scores stage): granularity "matrix",
    q and p within the stored fraction, no sign-flip or skip-first control."""
    if cfg.granularity != "matrix" or cfg.sign_flip or cfg.skip_first:
        raise app.UsageError(f"{cfg.harm_scores} holds score candidates, which serve granularity 'matrix' "
                             "without sign_flip/skip_first; rescore with keep_dense_scores=True for the others.")
    harm, shapes, harm_summary = load_candidates(cfg.harm_scores)
    retain, retain_summary = (None, {})
    if cfg.retain_scores:
        retain, _, retain_summary = load_candidates(cfg.retain_scores)
    indices = select_indices(harm, retain, shapes, cfg.q, cfg.p)
    return mask_from_indices(indices, shapes, shardings), harm_summary, retain_summary


def _select(cfg):
    if not cfg.harm_scores:
        raise app.UsageError("Give --config.harm_scores (a score dir) or --config.intersect (mask dirs).")
    harm_summary = read_summary(cfg.harm_scores)
    shardings, num_params = model_layout(cfg.model or harm_summary.get("model", ""), cfg.mesh)
    if has_candidates(cfg.harm_scores):
        mask, harm_summary, retain_summary = _select_from_candidates(cfg, shardings)
    else:
        harm, harm_summary = load_scores(cfg.harm_scores, shardings)
        retain, retain_summary = (None, {})
        if cfg.retain_scores:
            retain, retain_summary = load_scores(cfg.retain_scores, shardings)
        mask = select(harm, retain, q=cfg.q, p=cfg.p, granularity=cfg.granularity,
                      sign_flip=cfg.sign_flip, skip_first=cfg.skip_first)
    fields = ("kind", "data", "nsamples", "seed", "text_format")
    summary = {
        "method": "select",
        "model": harm_summary.get("model"),
        "data": harm_summary.get("data"),
        "nsamples": harm_summary.get("nsamples"),
        "seed": harm_summary.get("seed"),
        "q": cfg.q,
        "p": cfg.p if cfg.retain_scores else None,
        "granularity": cfg.granularity,
        "sign_flip": cfg.sign_flip,
        "skip_first": cfg.skip_first,
        "harm_scores": {"dir": os.path.abspath(cfg.harm_scores), **{k: harm_summary.get(k) for k in fields}},
        "retain_scores": ({"dir": os.path.abspath(cfg.retain_scores), **{k: retain_summary.get(k) for k in fields}}
                          if cfg.retain_scores else None),
    }
    return mask, summary, num_params


def main(argv):
    del argv
    cfg = checked_config(_CONFIG)  # a slip in the config: one line, before start-up
    init_runtime()
    if cfg.intersect:
        mask, summary, num_params = _intersect(cfg)
        default_dir = os.path.join("runs", "mask_intersect")
    else:
        mask, summary, num_params = _select(cfg)
        default_dir = os.path.join("runs", f"mask_{cfg.granularity}_q{cfg.q:g}_p{cfg.p:g}")
    out_dir = cfg.output_dir or default_dir
    save_mask(out_dir, mask, summary, num_params=num_params, dense=cfg.dense_copy)
    print(format_counts(read_summary(out_dir)["counts"]))
    print(f"mask written to {os.path.abspath(out_dir)}")


if __name__ == "__main__":
    run_app(main)
