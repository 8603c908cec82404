"""The end-to-end experiment (`harmjax.pipeline.run_experiment`) on a GPU: a random-weight
Llama of a given shape with the embedded SmolLM2 tokenizer, on a given harmful-prompt CSV.

A functional and timing check of every stage on an accelerator (answers with the decode
kernel, scans, selection, evaluation, report), for machines without hub access:

  python benchmarks/pipeline_gpu_check.py --tokenizer_dir=DIR --harmful=strongreject.csv --out=OUT
  python benchmarks/pipeline_gpu_check.py ... --mesh=1,-1,1   # FSDP, as the paper configs
Random weights mean the numbers in the report carry no science; the stage times do.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from absl import app, flags

_TOKENIZER = flags.DEFINE_string("tokenizer_dir", "", "Directory with tokenizer.json + tokenizer_config.json.")
_HARMFUL = flags.DEFINE_string("harmful", "", "StrongREJECT-style CSV (forbidden_prompt, category).")
_OUT = flags.DEFINE_string("out", "/tmp/pipeline_gpu", "Where the report files and the JSON result go.")
_WORK = flags.DEFINE_string("work", "/tmp/pipeline_gpu_work", "Model and stage cache (large).")
_HIDDEN = flags.DEFINE_integer("hidden", 2048, "Hidden size.")
_LAYERS = flags.DEFINE_integer("layers", 16, "Layers.")
_PER_CATEGORY = flags.DEFINE_integer("per_category", 20, "Prompts per category.")
_MESH = flags.DEFINE_list("mesh", ["-1", "1", "1"], "Mesh sizes data,fsdp,tensor (-1 = the rest); "
                          "the paper configs use 1,-1,1 (FSDP over every local device).")


def build_model(directory: str) -> str:
    """A random bf16 Llama (Llama-3.2-1B-like shape, the tokenizer's vocabulary) saved as HF."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(_TOKENIZER.value)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=_HIDDEN.value, intermediate_size=4 * _HIDDEN.value,
        num_hidden_layers=_LAYERS.value, num_attention_heads=_HIDDEN.value // 64, num_key_value_heads=min(8, _HIDDEN.value // 64),
        max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(_TOKENIZER.value, name), directory)
    return directory


def main(argv):
    del argv
    from configs.embedded import get_config
    from harmjax.pipeline import run_experiment

    os.makedirs(_OUT.value, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = build_model(os.path.join(_WORK.value, "model"))
    cfg = get_config()
    cfg.model, cfg.dtype, cfg.output_dir = model_dir, "bfloat16", os.path.join(_WORK.value, "run")
    cfg.prompts.harmful = _HARMFUL.value
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = (int(x) for x in _MESH.value)
    cfg.prompts.per_category = _PER_CATEGORY.value
    cfg.prompts.benign_per_category = 0  # all 132
    cfg.answers.max_new_tokens, cfg.answers.batch_size, cfg.answers.chunk = 128, 128, 256
    cfg.answers.min_words = 0  # random weights never refuse by phrase; keep every answer
    cfg.scoring.batch_size, cfg.scoring.max_length, cfg.scoring.abs_chunk = 16, 256, 4
    cfg.masks.q_sweep = (1e-5, 1e-4, 1e-3)
    cfg.evaluation.max_length, cfg.evaluation.batch_size = 256, 64
    cfg.evaluation.generation_prompts, cfg.evaluation.max_new_tokens = 48, 64
    cfg.evaluation.generation_batch_size = 48
    build = time.perf_counter() - t0
    metrics = run_experiment(cfg)
    import jax

    result = {"device": str(jax.devices()[0].device_kind), "devices": jax.device_count(),
              "mesh": [int(x) for x in _MESH.value], "jax": jax.__version__, "build_model_s": build,
              "wall_s": metrics["wall_seconds"], "timings": metrics["timings"], "data": metrics["data"],
              "hidden": _HIDDEN.value, "layers": _LAYERS.value, "parameters": metrics["model"]["parameters"]}
    for name in os.listdir(cfg.output_dir):
        if name.endswith((".md", ".json", ".png")):
            shutil.copy(os.path.join(cfg.output_dir, name), _OUT.value)
    with open(os.path.join(_OUT.value, "pipeline_gpu.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(json.dumps({k: v for k, v in result.items() if k != "data"}, default=str))


if __name__ == "__main__":
    app.run(main)
