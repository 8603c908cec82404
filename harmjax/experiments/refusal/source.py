"""Model sources of the experiments, including the refusal-tuned model harmjax makes itself.

`model = "refusal"` in an experiment config (compression, EM, dissociation) stands for the
refusal-tuned variant of the config's `refusal` block (configs/refusal_embedded.py), made on
first use and reused after by `harmjax.experiments.refusal.run.ensure_refusal_model`. Every
other value is a model source as `harmjax.load` takes it ("embedded", a directory, a .gguf
file, a hub id).
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
        from harmjax.experiments.refusal.run import ensure_refusal_model

        return ensure_refusal_model(refusal_cfg, progress=progress, experiment_cfg=experiment_cfg)
    from harmjax.assets import resolve_model_source

    return resolve_model_source(model)


def refusal_heldout_ids(refusal_cfg) -> set[str]:
    """Ids of the harmful prompts the refusal tuning of `refusal_cfg` never trained on."""
    from harmjax.experiments.core.stages import as_config
    from harmjax.experiments.refusal.data import split_prompts

    return {e.id for e in split_prompts(as_config(refusal_cfg)).heldout}


__all__ = ["REFUSAL", "refusal_heldout_ids", "resolve_source"]
