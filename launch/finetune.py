"""Fine-tuning with optax (rsLoRA or full), optionally on a pruned model with the pruned weights
held at zero; with `experiment=True` (configs/em_embedded.py, configs/em_llama31_8b.py) the
emergent-misalignment experiment of the paper.

  python -m launch.finetune --config=configs/finetune.py --config.data=narrow.jsonl [--config.mask=DIR]
  python -m launch.finetune --config=configs/em_embedded.py

Rerunning after a kill resumes: training from its last checkpoint (same data order, optimizer
state and PRNG), the experiment from its unfinished stage.
"""

from __future__ import annotations

import json
import os

from harmjax import distributed
from launch.common import config_flag, config_main, mesh_config, resolve_model_source, run_app

_CONFIG = config_flag("configs/finetune.py", "Fine-tuning or EM-experiment config file.")


def load_examples(cfg) -> list:
    """The training examples: a chat JSONL ({"messages": [...]}) or a prompt/response table."""
    from harmjax.data.loaders import load_chat_jsonl
    from harmjax.data.records import DatasetFormatError, read_records, to_examples
    from harmjax.errors import MissingFileError

    if not cfg.data:
        raise ValueError("Set --config.data to a chat JSONL or a prompt/response .csv/.jsonl/.json file.")
    if not os.path.exists(cfg.data):
        raise MissingFileError(f"Training data {cfg.data} does not exist.")
    rows = read_records(cfg.data)
    if rows and "messages" in rows[0]:
        return load_chat_jsonl(cfg.data)
    examples, _ = to_examples(rows, prompt_key=cfg.prompt_key, response_key=cfg.response_key, source=cfg.data)
    if not examples:
        raise DatasetFormatError(f"No examples in {cfg.data}.")
    return examples


def run(cfg) -> dict:
    """One fine-tuning run (or the EM experiment when cfg.experiment); returns its summary."""
    if cfg.experiment:
        from harmjax.experiments.em.run import run_em_experiment

        return run_em_experiment(cfg)
    import harmjax
    from harmjax.masks import apply_mask, load_mask
    from harmjax.experiments.core.training import lora_config, train_config
    from harmjax.train import export_merged, export_peft, finetune

    source = resolve_model_source(cfg.model)
    out_dir = cfg.output_dir or os.path.join("runs", f"finetune-{os.path.basename(os.path.normpath(source))}")
    examples = load_examples(cfg)  # before the (large) model: a bad file fails fast
    model = harmjax.load(source, dtype=cfg.dtype, mesh=mesh_config(cfg.mesh))
    mask = None
    if cfg.mask:
        mask, _ = load_mask(cfg.mask, model.params)
        model = model.with_params(apply_mask(model.params, mask))
    lora = lora_config(cfg.lora)
    result = finetune(model, examples, train_config(cfg.train), lora=lora, mask=mask,
                      output_dir=os.path.join(out_dir, "train"), tensorboard=cfg.tensorboard)
    if cfg.export.peft and lora is not None:
        export_peft(result.adapters, lora, os.path.join(out_dir, "peft"), base_model_name_or_path=cfg.model, mask=mask)
    if cfg.export.merged:
        export_merged(model, result.params, os.path.join(out_dir, "merged"))
    summary = {"model": cfg.model, "data": cfg.data, "examples": len(examples), "mask": cfg.mask,
               "steps": result.steps, "train_loss": result.train_loss, "val_loss": result.val_loss,
               "tokens": result.tokens, "seconds": result.seconds, "resumed_from": result.resumed_from}
    if distributed.is_writer():  # every process trained; one writes
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps(summary, indent=2))
    distributed.barrier(f"summary {out_dir}")
    return summary


main = config_main(run, _CONFIG)


if __name__ == "__main__":
    run_app(main)
