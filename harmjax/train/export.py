"""Exports of a fine-tuning result: a PEFT LoRA adapter directory and merged HF weights.

The PEFT directory (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (r, in) / `lora_B.weight`
(out, r), float32) loads with `peft.PeftModel.from_pretrained` and with
`harmjax.io.lora.read_lora_adapter`. An adapter alone cannot hold pruned weights at zero (PEFT
adds B A everywhere), so when training used a mask it is written beside it as
`mask_indices.safetensors` (per HF name, the int64 flat indices of the pruned weights) with a
README saying to apply it after merging.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from harmjax import distributed
from harmjax.distributed import to_host
from harmjax.io.lora import PEFT_PREFIX  # the key prefix PEFT writes and harmjax.io.lora reads
from harmjax.masks.storage import export_safetensors, write_mask_indices
from harmjax.train.lora import LoraConfig
from harmjax.tree import iter_leaves


def peft_config(lora_cfg: LoraConfig, base_model_name_or_path: str = "") -> dict[str, Any]:
    """adapter_config.json contents for `lora_cfg`."""
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.r,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "use_rslora": lora_cfg.use_rslora,
        "target_modules": sorted(lora_cfg.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
    }
    if lora_cfg.layers is not None:
        cfg["layers_to_transform"] = sorted(lora_cfg.layers)
        cfg["layers_pattern"] = "layers"
    return cfg


def export_peft(adapters: Mapping[str, Any], lora_cfg: LoraConfig, out_dir: str,
                base_model_name_or_path: str = "", mask: Mapping[str, Any] | None = None) -> str:
    """Writes `adapters` as a PEFT LoRA adapter directory; with `mask`, also
    mask_indices.safetensors and a README line. Returns `out_dir`. In a multi-process job every
    process calls it and process 0 writes."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for name, leaf in iter_leaves(adapters):
        module, which = name.rsplit(".", 1)
        tensors[f"{PEFT_PREFIX}{module}.{which}.weight"] = to_host(leaf).astype(np.float32)
    export_safetensors(tensors, os.path.join(out_dir, "adapter_model.safetensors"), progress=False)
    if mask is not None:  # collective: every process gathers, process 0 writes
        write_mask_indices(os.path.join(out_dir, "mask_indices.safetensors"), mask)
    if distributed.is_writer():
        _write_peft_files(out_dir, lora_cfg, base_model_name_or_path, mask is not None)
    distributed.barrier(f"exported {out_dir}")
    return out_dir


def _write_peft_files(out_dir: str, lora_cfg: LoraConfig, base_model_name_or_path: str, masked: bool) -> None:
    tmp = os.path.join(out_dir, "adapter_config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(peft_config(lora_cfg, base_model_name_or_path), f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "adapter_config.json"))
    if masked:
        with open(os.path.join(out_dir, "README.md"), "w") as f:
            f.write(
                "This LoRA adapter was trained on a pruned model. The adapter alone does not keep the "
                "pruned weights at zero: after merging it (W + scale * B @ A), set the pruned weights "
                "back to 0, or use the merged export, which is exactly zero there. mask_indices.safetensors "
                "holds, per HF tensor name, the flat indices of the pruned weights:\n\n"
                "    for name, idx in safetensors.torch.load_file('mask_indices.safetensors').items(): "
                "model.get_parameter(name).data.view(-1)[idx] = 0\n"
            )


def export_merged(model, merged_params: Mapping[str, Any], out_dir: str) -> str:
    """Merged (and re-masked) params as a transformers checkpoint: `harmjax.save_hf`."""
    from harmjax.loading import save_hf

    return save_hf(model.with_params(merged_params), out_dir)
