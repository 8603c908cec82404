"""The end-to-end experiment (`harmjax.experiments.run_experiment`) on a GPU: a random-weight
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
_SHAPE = flags.DEFINE_enum("shape", "", ["", "llama31_8b", "qwen25_14b", "qwen25_32b", "tiny_qwen2"],
                           "A paper model's shape, made with random bf16 weights on the devices and saved "
                           "with orbax (no host copy); empty: the --hidden/--layers Llama built with PyTorch.")
_SCAN_BATCH = flags.DEFINE_integer("scan_batch", 16, "Scan micro-batch rows (scoring.batch_size). Not part of "
                                   "the scores stage's key: a rerun with another batch keeps finished units.")
_Q_SWEEP = flags.DEFINE_list("q_sweep", ["1e-5", "1e-4", "1e-3"], "Harm-mask fractions; the largest of them "
                              "and p (5e-5) sets the candidates kept per matrix (the paper: up to 5e-5).")
_MESH = flags.DEFINE_list("mesh", ["-1", "1", "1"], "Mesh sizes data,fsdp,tensor (-1 = the rest, tensor 0 = "
                          "harmjax.HOST); the 14B and 32B configs use 1,-1,0 (tensor parallelism inside "
                          "a host, FSDP across hosts).")
_LAYERWISE = flags.DEFINE_bool("layerwise", False, "Scan steps as per-block programs (scoring.layerwise, as the "
                               "14B and 32B configs).")


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


# HF config fields of the paper models' shapes (vocabulary sizes as the real ones; the
# embedded tokenizer's ids all fall inside them).
PAPER_SHAPES = {
    "llama31_8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "qwen25_14b": dict(model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                       num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, rope_theta=1e6),
    "qwen25_32b": dict(model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                       num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8, rope_theta=1e6),
    "tiny_qwen2": dict(model_type="qwen2", vocab_size=49152, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6),
}


def build_model_on_devices(directory: str) -> str:
    """A random bf16 model of --shape made directly in its shardings (an 8-32B model never
    exists on the host) and saved with `harmjax.save_orbax`, which `harmjax.load` reads back."""
    import jax
    import transformers

    import harmjax
    from harmjax.config import ModelConfig
    from harmjax.loading import Model
    from harmjax.model.init import init_params

    if os.path.isdir(os.path.join(directory, "params")):
        return directory  # made by an earlier run
    tok = transformers.AutoTokenizer.from_pretrained(_TOKENIZER.value)
    fields = dict(PAPER_SHAPES[_SHAPE.value], max_position_embeddings=4096, tie_word_embeddings=False,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, torch_dtype="bfloat16")
    hf_config = transformers.AutoConfig.for_model(**fields).to_dict()
    config = ModelConfig.from_hf(hf_config)
    mesh = harmjax.make_mesh(harmjax.MeshConfig(*(int(x) for x in _MESH.value)), model_config=config)
    params = init_params(config, jax.random.key(0), mesh, jax.numpy.bfloat16)
    model = Model(params=params, config=config, tokenizer=tok, hf_config=hf_config, mesh=mesh,
                  source_dir=_TOKENIZER.value)
    harmjax.save_orbax(model, directory)
    return directory


def _disk_bytes(path: str) -> int:
    if not os.path.isdir(path):
        return 0
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv):
    del argv
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # launch.common's default
    import jax

    # As launch.common: compiled programs persist beside the work, so a resumed run (a second
    # call after a time limit) skips compiling.
    jax.config.update("jax_compilation_cache_dir", os.path.join(_WORK.value, "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from configs.embedded import get_config
    from harmjax.experiments import run_experiment

    os.makedirs(_OUT.value, exist_ok=True)
    t0 = time.perf_counter()
    builder = build_model_on_devices if _SHAPE.value else build_model
    model_dir = builder(os.path.join(_WORK.value, "model"))
    cfg = get_config()
    cfg.model, cfg.dtype, cfg.output_dir = model_dir, "bfloat16", os.path.join(_WORK.value, "run")
    cfg.prompts.harmful = _HARMFUL.value
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = (int(x) for x in _MESH.value)
    cfg.prompts.per_category = _PER_CATEGORY.value
    cfg.prompts.benign_per_category = 0  # all 132
    cfg.answers.max_new_tokens, cfg.answers.batch_size, cfg.answers.chunk = 128, 128, 256
    cfg.answers.min_words = 0  # random weights never refuse by phrase; keep every answer
    cfg.scoring.batch_size, cfg.scoring.max_length, cfg.scoring.abs_chunk = _SCAN_BATCH.value, 256, 4
    if _SHAPE.value:  # as the paper configs: remat, and one accumulator tree per retain pass
        cfg.scoring.remat, cfg.scoring.separate_retain_passes = True, True
    cfg.scoring.layerwise = _LAYERWISE.value
    cfg.masks.q_sweep = tuple(float(q) for q in _Q_SWEEP.value)
    cfg.evaluation.max_length, cfg.evaluation.batch_size = 256, 64
    cfg.evaluation.generation_prompts, cfg.evaluation.max_new_tokens = 48, 64
    cfg.evaluation.generation_batch_size = 48
    build = time.perf_counter() - t0
    metrics = run_experiment(cfg)

    cache = os.path.join(cfg.output_dir, "cache")
    stage_disk = {name: _disk_bytes(os.path.join(cache, name)) for name in sorted(os.listdir(cache))}
    result = {"device": str(jax.devices()[0].device_kind), "devices": jax.device_count(), "shape": _SHAPE.value,
              "peak_gib_per_device": [round((d.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30, 2)
                                      for d in jax.local_devices()],
              "run_dir_bytes": _disk_bytes(cfg.output_dir), "stage_dir_bytes": stage_disk,
              "model_dir_bytes": _disk_bytes(model_dir),
              "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
              "mesh": [int(x) for x in _MESH.value], "layerwise": _LAYERWISE.value, "jax": jax.__version__, "build_model_s": build,
              "wall_s": metrics["wall_seconds"], "timings": metrics["timings"], "data": metrics["data"],
              **({} if _SHAPE.value else {"hidden": _HIDDEN.value, "layers": _LAYERS.value}), "parameters": metrics["model"]["parameters"]}
    for name in os.listdir(cfg.output_dir):
        if name.endswith((".md", ".json", ".png")):
            shutil.copy(os.path.join(cfg.output_dir, name), _OUT.value)
    with open(os.path.join(_OUT.value, "pipeline_gpu.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(json.dumps({k: v for k, v in result.items() if k != "data"}, default=str))


if __name__ == "__main__":
    app.run(main)
