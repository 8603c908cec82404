"""harmjax: find, remove and measure the weights an LLM uses to generate harmful content.

The public surface, all pure functions or plain data over a params pytree that keeps
Hugging Face's tensor names and orientation:

  model = harmjax.load("path/or/org-name-or.gguf", dtype="bfloat16", mesh=MeshConfig(fsdp=-1))
  logits = harmjax.forward(model.params, model.config, input_ids, attention_mask)
  harmjax.save_hf(model, "out_dir")
"""

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
from harmjax.sharding import MeshConfig, make_mesh, param_shardings

__version__ = "0.1.0"

__all__ = [
    "AssetError",
    "CheckpointError",
    "HarmjaxError",
    "HubUnavailableError",
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
