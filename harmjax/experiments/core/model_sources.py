"""Loading an experiment's model. The refusal-tuned model harmjax makes itself (`model =
"refusal"`) is resolved to a directory by `harmjax.experiments.refusal.source`."""

from __future__ import annotations


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


__all__ = ["load_model"]
