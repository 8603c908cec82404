"""harmjax: find, remove and measure the weights an LLM uses to generate harmful content.

The public surface, all pure functions or plain data over a params pytree that keeps
Hugging Face's tensor names and orientation:

  model = harmjax.load("path/or/org-name-or.gguf", dtype="bfloat16", mesh=MeshConfig(fsdp=-1))
  logits = harmjax.forward(model.params, model.config, input_ids, attention_mask)
  harm = harmjax.score(model, harmful_examples, kind="harm")        # -W * sum_i dL_i/dW
  scores = harmjax.attribute(apply_fn, any_params, batches, "harm")  # any Flax/JAX model
  module, variables = harmjax.FlaxDecoder.from_model(model)          # the decoder as a linen module
  retain = harmjax.score(model, benign_examples, kind="retain")     # |W| * sum_i |dL_i/dW|
  mask = harmjax.select(harm, retain, q=1e-5, p=5e-5)              # bool pytree, True = pruned
  pruned = harmjax.apply_mask(model.params, mask)
  out = harmjax.generate(model.with_params(pruned), prompts, prefixes=prefixes)
  harmjax.export_safetensors(mask, "mask.safetensors")             # HF names, for PyTorch users
  harmjax.save_hf(model, "out_dir")

  result = harmjax.finetune(model, examples, TrainConfig(), lora=LoraConfig(), mask=mask)
  harmjax.pipeline.run_experiment(cfg)                             # the whole experiment, cached
Submodules: `harmjax.attribution`, `harmjax.masks`, `harmjax.generate`, `harmjax.evaluate`,
`harmjax.data`, `harmjax.train`, `harmjax.pipeline`, `harmjax.report`, `harmjax.distributed`
(multi-process start-up: `harmjax.distributed.initialize(...)` before any other JAX use).
"""

from harmjax import distributed
from harmjax.config import ModelConfig, RopeConfig, SUPPORTED_MODEL_TYPES
from harmjax.errors import (
    AssetError,
    CheckpointError,
    HarmjaxError,
    HubUnavailableError,
    MissingFileError,
    UnsupportedArchitectureError,
    UnsupportedDtypeError,
)
from harmjax.inference import jit_forward, text_nll
from harmjax.loading import Model, load, save_hf, save_orbax
from harmjax.model.decoder import forward, hidden_states, logits_from_hidden
from harmjax.model.param_specs import param_specs
from harmjax.sharding import HOST, MeshConfig, make_mesh, param_shardings
from harmjax.attribution import ScanResult, attribute, scan, score
from harmjax.model.flax_module import FlaxDecoder
from harmjax.masks import (
    MaskMismatchError,
    apply_mask,
    complement,
    difference,
    export_safetensors,
    intersect_all,
    intersection,
    jaccard,
    load_mask,
    load_safetensors_tree,
    load_scores,
    mask_counts,
    save_mask,
    save_scores,
    select,
    union,
)
from harmjax import generate  # noqa: E402  (a callable package: harmjax.generate(model, prompts))
from harmjax.generate import GenerationResult
from harmjax import pipeline, train  # noqa: E402
from harmjax.train import FinetuneResult, LoraConfig, TrainConfig, export_peft, finetune  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AssetError",
    "FinetuneResult",
    "FlaxDecoder",
    "attribute",
    "LoraConfig",
    "TrainConfig",
    "export_peft",
    "finetune",
    "pipeline",
    "train",
    "GenerationResult",
    "MaskMismatchError",
    "ScanResult",
    "apply_mask",
    "complement",
    "difference",
    "export_safetensors",
    "generate",
    "intersect_all",
    "intersection",
    "jaccard",
    "load_mask",
    "load_safetensors_tree",
    "load_scores",
    "mask_counts",
    "save_mask",
    "save_scores",
    "scan",
    "score",
    "select",
    "union",
    "CheckpointError",
    "HarmjaxError",
    "HubUnavailableError",
    "HOST",
    "MeshConfig",
    "MissingFileError",
    "Model",
    "ModelConfig",
    "RopeConfig",
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedArchitectureError",
    "UnsupportedDtypeError",
    "forward",
    "hidden_states",
    "jit_forward",
    "load",
    "logits_from_hidden",
    "make_mesh",
    "param_shardings",
    "param_specs",
    "save_hf",
    "save_orbax",
    "text_nll",
]
