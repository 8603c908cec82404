"""Fine-tuning with optax: full or LoRA/rsLoRA, response-only loss, pruned weights held at 0.

  result = harmjax.train.finetune(model, examples, TrainConfig(lr=1e-5, batch_size=16),
                                  lora=LoraConfig(r=32, alpha=64), mask=mask, output_dir="ft")
  harmjax.train.export_peft(result.adapters, lora_cfg, "ft/peft", mask=mask)
  harmjax.save_hf(model.with_params(result.params), "ft/merged")
"""

from harmjax.train.export import export_merged, export_peft, peft_config
from harmjax.train.lora import (
    PROJECTIONS, LoraConfig, LoraWeight, adapter_shardings, apply_lora, init_lora, mask_plans, merge_adapters,
)
from harmjax.train.loop import FinetuneResult, FinetuneResumeError, finetune
from harmjax.train.optim import TrainConfig, lr_schedule, make_optimizer, trainable_names
from harmjax.train.step import StepSpec, init_state, make_eval_step, make_train_step

__all__ = [
    "FinetuneResult", "FinetuneResumeError", "LoraConfig", "LoraWeight", "PROJECTIONS", "StepSpec",
    "TrainConfig", "adapter_shardings", "apply_lora", "export_merged", "export_peft", "finetune",
    "init_lora", "init_state", "lr_schedule", "make_eval_step", "make_optimizer", "make_train_step",
    "mask_plans", "merge_adapters", "peft_config", "trainable_names",
]
