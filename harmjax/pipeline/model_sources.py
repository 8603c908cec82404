"""Model sources of the experiments, including the refusal-tuned model harmjax makes itself.

`model = "refusal"` in an experiment config (compression, EM) stands for the refusal-tuned
variant of the config's `refusal` block (configs/refusal_embedded.py), made on first use and
reused after by `harmjax.pipeline.refusal_model.ensure_refusal_model`. Every other value is a
model source as `harmjax.load` takes it ("embedded", a directory, a .gguf file, a hub id).
"""

from __future__ import annotations

REFUSAL = "refusal"


def resolve_source(model: str, refusal_cfg=None, *, experiment_cfg=None, progress: bool = True) -> str:
    """The loadable source of `model`: the refusal-tuned model's directory for "refusal" (made
    with `refusal_cfg`; with `experiment_cfg`, also checked never to have trained on that
    experiment's held-out prompts), else `harmjax.assets.resolve_model_source(model)`."""
    if model == REFUSAL:
        if refusal_cfg is None:
            raise ValueError('model="refusal" needs the config\'s `refusal` block (configs/refusal_embedded.py).')
        from harmjax.pipeline.refusal_model import ensure_refusal_model

        return ensure_refusal_model(refusal_cfg, progress=progress, experiment_cfg=experiment_cfg)
    from harmjax.assets import resolve_model_source

    return resolve_model_source(model)


def load_model(cfg, source: str):
    """(model, load seconds, model id) of an experiment: `source` loaded with the config's
    dtype and mesh; the id ({source, architecture, dtype}) goes into stage settings, so a
    different model or dtype recomputes every stage."""
    import time

    import harmjax
    from harmjax.sharding import MeshConfig

    t0 = time.perf_counter()
    model = harmjax.load(source, dtype=cfg.dtype, mesh=MeshConfig(**dict(cfg.mesh)))
    seconds = time.perf_counter() - t0
    return model, seconds, {"source": source, "config": repr(model.config), "dtype": cfg.dtype}


def refusal_heldout_ids(refusal_cfg) -> set[str]:
    """Ids of the harmful prompts the refusal tuning of `refusal_cfg` never trained on."""
    from harmjax.pipeline.refusal_data import split_prompts
    from harmjax.pipeline.stages import as_config

    return {e.id for e in split_prompts(as_config(refusal_cfg)).heldout}


__all__ = ["REFUSAL", "load_model", "refusal_heldout_ids", "resolve_source"]
