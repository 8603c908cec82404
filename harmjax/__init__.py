"""harmjax: find, remove and measure the weights an LLM uses to generate harmful content.

The public surface, all pure functions or plain data over a params pytree that keeps
Hugging Face's tensor names and orientation:

  model = harmjax.load("path/or/org-name-or.gguf", dtype="bfloat16", mesh=MeshConfig(fsdp=-1))
  logits = harmjax.forward(model.params, model.config, input_ids, attention_mask)
  harm = harmjax.score(model, harmful_examples, kind="harm")        # -W * sum_i dL_i/dW
  retain = harmjax.score(model, benign_examples, kind="retain")     # |W| * sum_i |dL_i/dW|
  mask = harmjax.select(harm, retain, q=1e-5, p=5e-5)              # bool pytree, True = pruned
  pruned = harmjax.apply_mask(model.params, mask)
  out = harmjax.generate(model.with_params(pruned), prompts, prefixes=prefixes)
  harmjax.export_safetensors(mask, "mask.safetensors")             # HF names, for PyTorch users
  harmjax.save_hf(model, "out_dir")

  scores = harmjax.attribute(apply_fn, any_params, batches, "harm")  # any Flax/JAX model
  module, variables = harmjax.FlaxDecoder.from_model(model)          # the decoder as a linen module
  result = harmjax.finetune(model, examples, TrainConfig(), lora=LoraConfig(), mask=mask)
  harmjax.experiments.run_experiment(cfg)                          # the whole experiment, cached

Every name loads on first use, so `import harmjax` stays light: the experiments, training
and the evaluators are imported only when a program touches them. Submodules:
`harmjax.attribution`, `harmjax.masks`, `harmjax.generate`, `harmjax.evaluate`, `harmjax.data`,
`harmjax.train`, `harmjax.direction` (the refusal direction), `harmjax.experiments`
(`harmjax.pipeline` is its old name), `harmjax.report`,
`harmjax.distributed` (multi-process start-up: `harmjax.distributed.initialize(...)` before any
other JAX use).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it, grouped by topic (gemma's gm/nn/__init__.py keeps
# the same order). A name whose module is the name itself is a submodule.
_EXPORTS: dict[str, dict[str, str]] = {
    "Loading and saving models": {
        "Model": "harmjax.loading",
        "load": "harmjax.loading",
        "save_hf": "harmjax.loading",
        "save_orbax": "harmjax.loading",
        "ModelConfig": "harmjax.config",
        "RopeConfig": "harmjax.config",
        "SUPPORTED_MODEL_TYPES": "harmjax.config",
    },
    "The decoder": {
        "forward": "harmjax.model.decoder",
        "hidden_states": "harmjax.model.decoder",
        "logits_from_hidden": "harmjax.model.decoder",
        "param_specs": "harmjax.model.param_specs",
        "FlaxDecoder": "harmjax.model.flax_module",
        "jit_forward": "harmjax.inference",
        "text_nll": "harmjax.inference",
    },
    "Meshes and sharding": {
        "HOST": "harmjax.sharding",
        "MeshConfig": "harmjax.sharding",
        "make_mesh": "harmjax.sharding",
        "param_shardings": "harmjax.sharding",
    },
    "Attribution scores": {
        "ScanResult": "harmjax.attribution",
        "attribute": "harmjax.attribution",
        "scan": "harmjax.attribution",
        "score": "harmjax.attribution",
    },
    "Selecting, composing and applying masks": {
        "MaskMismatchError": "harmjax.masks",
        "select": "harmjax.masks",
        "union": "harmjax.masks",
        "intersection": "harmjax.masks",
        "intersect_all": "harmjax.masks",
        "difference": "harmjax.masks",
        "complement": "harmjax.masks",
        "jaccard": "harmjax.masks",
        "mask_counts": "harmjax.masks",
        "apply_mask": "harmjax.masks",
    },
    "Masks and scores on disk": {
        "save_mask": "harmjax.masks",
        "load_mask": "harmjax.masks",
        "save_scores": "harmjax.masks",
        "load_scores": "harmjax.masks",
        "export_safetensors": "harmjax.masks",
        "load_safetensors_tree": "harmjax.masks",
    },
    "Generation": {
        "generate": "harmjax.generate",  # a callable package: harmjax.generate(model, prompts)
        "GenerationResult": "harmjax.generate",
    },
    "Fine-tuning": {
        "FinetuneResult": "harmjax.train",
        "LoraConfig": "harmjax.train",
        "TrainConfig": "harmjax.train",
        "export_peft": "harmjax.train",
        "finetune": "harmjax.train",
    },
    "Errors": {
        "HarmjaxError": "harmjax.errors",
        "AssetError": "harmjax.errors",
        "CheckpointError": "harmjax.errors",
        "HubUnavailableError": "harmjax.errors",
        "MissingFileError": "harmjax.errors",
        "UnsupportedArchitectureError": "harmjax.errors",
        "UnsupportedDtypeError": "harmjax.errors",
    },
    "Subpackages": {
        name: f"harmjax.{name}"
        for name in ("attribution", "data", "direction", "distributed", "evaluate", "experiments", "masks",
                     "pipeline", "report", "train")
    },
}
_WHERE = {name: module for group in _EXPORTS.values() for name, module in group.items()}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    """Loads a public name's module on first use and keeps the name here."""
    module = _WHERE.get(name)
    if module is None:
        # Any other submodule (harmjax.io, harmjax.model, ...) loads on first use too.
        if name.startswith("_") or importlib.util.find_spec(f"harmjax.{name}") is None:
            raise AttributeError(f"module 'harmjax' has no attribute {name!r}")
        module = f"harmjax.{name}"
    loaded = importlib.import_module(module)
    value = loaded if module == f"harmjax.{name}" else getattr(loaded, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:  # what static tools and IDEs see
    from harmjax import (
        attribution, data, direction, distributed, evaluate, experiments, generate, masks, pipeline, report, train,
    )
    from harmjax.attribution import ScanResult, attribute, scan, score
    from harmjax.config import SUPPORTED_MODEL_TYPES, ModelConfig, RopeConfig
    from harmjax.errors import (AssetError, CheckpointError, HarmjaxError, HubUnavailableError, MissingFileError,
                                UnsupportedArchitectureError, UnsupportedDtypeError)
    from harmjax.generate import GenerationResult
    from harmjax.inference import jit_forward, text_nll
    from harmjax.loading import Model, load, save_hf, save_orbax
    from harmjax.masks import (MaskMismatchError, apply_mask, complement, difference, export_safetensors,
                               intersect_all, intersection, jaccard, load_mask, load_safetensors_tree, load_scores,
                               mask_counts, save_mask, save_scores, select, union)
    from harmjax.model.decoder import forward, hidden_states, logits_from_hidden
    from harmjax.model.flax_module import FlaxDecoder
    from harmjax.model.param_specs import param_specs
    from harmjax.sharding import HOST, MeshConfig, make_mesh, param_shardings
    from harmjax.train import FinetuneResult, LoraConfig, TrainConfig, export_peft, finetune
