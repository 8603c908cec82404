"""Fine-tuning in the EM experiment: the original model and the pruned one (pruned weights held
at exactly 0), each saved once as merged params (orbax) and PEFT adapters."""

from __future__ import annotations

import os
from typing import Any

from harmjax.experiments.core.training import lora_config, train_config


def finetune_and_save(model, examples, cfg, directory: str, mask=None, progress: bool = True) -> dict[str, Any]:
    """Fine-tunes (resuming from `directory/train`), saves the merged params to
    `directory/params` (orbax) and the adapters in PEFT format to `directory/peft`."""
    from harmjax import checkpoint
    from harmjax.train import export_peft, finetune

    lora = lora_config(cfg.lora)
    result = finetune(model, examples, train_config(cfg.train), lora=lora, mask=mask,
                      output_dir=os.path.join(directory, "train"), progress=progress, tensorboard=cfg.tensorboard)
    checkpoint.save_tree(os.path.join(directory, "params"), result.params)
    if lora is not None:
        export_peft(result.adapters, lora, os.path.join(directory, "peft"), base_model_name_or_path=cfg.model, mask=mask)
    return {"steps": result.steps, "train_loss": result.train_loss, "val_loss": result.val_loss,
            "seconds": result.seconds, "resumed_from": result.resumed_from}


def load_params(model, directory: str):
    """The params saved by `finetune_and_save`, in the model's shardings."""
    from harmjax import checkpoint

    import jax

    dtype = jax.tree.leaves(model.params)[0].dtype
    target = checkpoint.abstract_params(model.config, model.mesh, dtype)
    return checkpoint.restore_tree(os.path.join(directory, "params"), target)
