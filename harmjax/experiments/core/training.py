"""Fine-tuning settings shared by the experiments that train (EM, refusal tuning): the config's
`train` and `lora` blocks as harmjax.train's dataclasses."""

from __future__ import annotations


def train_config(train_cfg):
    """A `harmjax.train.TrainConfig` from the config's `train` block."""
    from harmjax.train import TrainConfig

    return TrainConfig(**train_cfg.to_dict())


def lora_config(lora_cfg):
    """A `harmjax.train.LoraConfig` from the config's `lora` block (None when disabled)."""
    from harmjax.train import LoraConfig

    if not lora_cfg.enabled:
        return None
    targets = tuple(t for t in lora_cfg.targets.split(",") if t)
    layers = tuple(int(x) for x in lora_cfg.layers.split(",") if x) or None
    return LoraConfig(r=lora_cfg.r, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout, use_rslora=lora_cfg.use_rslora,
                      targets=targets, layers=layers)


__all__ = ["lora_config", "train_config"]
