"""The refusal tuning itself: the base model (config and tokenizer at once, weights on demand)
and the fine-tuning stage that writes the merged model as an HF directory."""

from __future__ import annotations

import json
import shutil
import os
from typing import Any

from harmjax import distributed
from harmjax.experiments.core.stages import fresh_dir, read_json, write_json_atomic
from harmjax.experiments.core.training import lora_config, train_config


class BaseModel:
    """The base model's config and tokenizer at once (they key the stages), its weights only
    when a stage has work to do: a cached run does not load them."""

    def __init__(self, source: str, cfg):
        from harmjax.config import ModelConfig, hf_config_from_dict
        from harmjax.io import hf as hf_io
        from harmjax.loading import gguf_as_hf_dir, load_tokenizer

        path = hf_io.resolve_checkpoint(source)
        directory = gguf_as_hf_dir(path) if path.endswith(".gguf") else path
        self.config = ModelConfig.from_hf(hf_config_from_dict(hf_io.read_config_json(directory)))
        self.tokenizer = load_tokenizer(directory)
        self.source, self.cfg, self._model = source, cfg, None

    @property
    def model(self):
        """The loaded model (loaded on first use)."""
        if self._model is None:
            import harmjax
            from harmjax.sharding import MeshConfig

            self._model = harmjax.load(self.source, dtype=self.cfg.dtype, mesh=MeshConfig(**dict(self.cfg.mesh)))
        return self._model


def tune(base: BaseModel, cfg, examples, directory: str, name: str, progress: bool) -> dict[str, Any]:
    """Fine-tunes (resuming from directory/train) and writes the merged model to
    directory/<name> by a rename, so the directory exists only complete."""
    from harmjax.train import export_merged, export_peft, finetune

    info_path, model_dir = os.path.join(directory, "train_info.json"), os.path.join(directory, name)
    if os.path.isdir(model_dir) and os.path.isfile(info_path):  # killed after the model was written
        return read_json(info_path)
    if distributed.is_writer():  # what was trained on, for audits (and the tests)
        with open(os.path.join(directory, "training_data.jsonl"), "w") as f:
            for e in examples:
                f.write(json.dumps({"id": e.id, "category": e.category, "prompt": e.prompt, "response": e.response}) + "\n")
    model, lora = base.model, lora_config(cfg.lora)
    result = finetune(model, examples, train_config(cfg.train), lora=lora, output_dir=os.path.join(directory, "train"),
                      progress=progress, tensorboard=cfg.tensorboard)
    info = {"steps": result.steps, "train_loss": result.train_loss, "val_loss": result.val_loss,
            "seconds": result.seconds, "resumed_from": result.resumed_from, "examples": len(examples)}
    if lora is not None:
        export_peft(result.adapters, lora, os.path.join(directory, "peft"), base_model_name_or_path=cfg.model)
    write_json_atomic(info_path, info)
    tmp = fresh_dir(model_dir)
    export_merged(model, result.params, tmp)
    if distributed.is_writer():
        if os.path.isdir(model_dir):  # a copy without its train_info.json: replace it
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
    distributed.barrier(f"wrote {model_dir}")
    return info
