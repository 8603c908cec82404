"""`harmjax.load`: any supported checkpoint to a `Model` (params, config, tokenizer).

Accepted sources: a local Hugging Face directory (single or sharded safetensors), a hub id
(through huggingface_hub, or its local cache when offline), or a GGUF file, which is first
converted once into an ordinary HF directory in harmjax's cache and then loaded like any
checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import jax
from absl import logging
from jax.sharding import Mesh

from harmjax.config import ModelConfig, hf_config_from_dict, text_tower_config
from harmjax.io import hf as hf_io
from harmjax.sharding import MeshConfig, make_mesh


@dataclasses.dataclass
class Model:
    """A loaded model: the params pytree, its frozen config and tokenizer.

    Attributes:
      params: nested dict with HF names and orientation, each leaf a sharded jax.Array.
      config: the decoder's `ModelConfig` (hashable; static under jit).
      tokenizer: the transformers tokenizer with its chat template (None if the checkpoint
        has no tokenizer files).
      hf_config: the checkpoint's config.json, written back on export.
      mesh: the device mesh the params are placed on.
      source_dir: the HF directory the model was read from.
    """

    params: dict[str, Any]
    config: ModelConfig
    tokenizer: Any
    hf_config: dict[str, Any]
    mesh: Mesh
    source_dir: str

    def with_params(self, params: dict[str, Any]) -> "Model":
        """The same model with other params (e.g. a masked copy)."""
        return dataclasses.replace(self, params=params)

    def num_params(self) -> int:
        """Number of parameters in `params`."""
        return sum(x.size for x in jax.tree.leaves(self.params))


def load(
    path_or_id: str,
    dtype: Any = None,
    mesh: Mesh | MeshConfig | None = None,
) -> Model:
    """Loads a causal LM of a supported family into a sharded params pytree.

    Args:
      path_or_id: a local HF checkpoint directory, a `.gguf` file, a directory written by
        `save_orbax`, or a hub id 'org/name'.
      dtype: parameter dtype, "float32", "bfloat16" or "float16"; None keeps the checkpoint's.
      mesh: a Mesh, a MeshConfig (`tensor=HOST`: tensor parallelism over each host's devices,
        sized to the model's heads), or None for all devices on the data axis (params replicated).

    Returns:
      A `Model`.
    """
    path = hf_io.resolve_checkpoint(path_or_id)
    directory = gguf_as_hf_dir(path) if path.endswith(".gguf") else path
    # A multimodal checkpoint (Gemma-3) is read, and later exported, as its text tower alone.
    raw_config = text_tower_config(hf_io.read_config_json(directory))
    config = ModelConfig.from_hf(hf_config_from_dict(raw_config))
    param_dtype = hf_io.resolve_dtype(dtype, raw_config)
    if not isinstance(mesh, Mesh):
        mesh = make_mesh(mesh, model_config=config)  # sizes MeshConfig(tensor=HOST) to the model
    if is_orbax_dir(directory):
        from harmjax import checkpoint

        target = checkpoint.abstract_params(config, mesh, param_dtype)
        params = checkpoint.restore_tree(os.path.join(directory, ORBAX_PARAMS), target)
    else:
        params = hf_io.load_params(directory, config, param_dtype, mesh)
    return Model(
        params=params,
        config=config,
        tokenizer=load_tokenizer(directory),
        hf_config=raw_config,
        mesh=mesh,
        source_dir=directory,
    )


ORBAX_PARAMS = "params"


def is_orbax_dir(directory: str) -> bool:
    """True for a directory written by `save_orbax`: config.json plus an orbax `params/`."""
    return os.path.isdir(os.path.join(directory, ORBAX_PARAMS)) and not any(
        f.endswith(".safetensors") for f in os.listdir(directory)
    )


def save_orbax(model: Model, out_dir: str, params: dict[str, Any] | None = None) -> str:
    """Saves params as an orbax checkpoint beside config.json and the tokenizer files, a
    directory that `load` reads back straight into any mesh's shardings."""
    from harmjax import checkpoint

    params = model.params if params is None else params
    os.makedirs(out_dir, exist_ok=True)
    hf_config = hf_io.config_for_params(model.hf_config, params, model.config)
    hf_io.write_config_and_tokenizer(hf_config, out_dir, model.tokenizer, model.source_dir)
    checkpoint.save_tree(
        os.path.join(out_dir, ORBAX_PARAMS),
        params,
        {"model_type": model.config.model_type, "source_dir": model.source_dir},
    )
    return out_dir


def load_tokenizer(directory: str):
    """The transformers tokenizer of a checkpoint directory, or None if it has none."""
    has_files = any(
        os.path.exists(os.path.join(directory, f))
        for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    )
    if not has_files:
        logging.warning("No tokenizer files in %s; Model.tokenizer is None.", directory)
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(directory)


def gguf_as_hf_dir(gguf_path: str) -> str:
    """Converts a GGUF file once into an HF directory in harmjax's cache and returns it.

    The cache key covers the file's absolute path, size and modification time, so an edited
    file is converted again. Processes sharing the cache (several processes of one job on a
    host or a shared file system) convert it once: the others wait on a file lock.
    """
    from harmjax.assets import _locked, cache_dir
    from harmjax.io.gguf import gguf_to_hf_dir

    stat = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    name = os.path.splitext(os.path.basename(gguf_path))[0]
    out_dir = os.path.join(cache_dir(), "gguf", f"{name}-{key}")
    with _locked(f"gguf-{name}-{key}"):
        if not os.path.isfile(os.path.join(out_dir, "config.json")):
            gguf_to_hf_dir(gguf_path, out_dir)
    return out_dir


def save_hf(model: Model, out_dir: str, params: dict[str, Any] | None = None) -> str:
    """Exports `model` (or `params` in its place, e.g. a pruned copy) as a transformers checkpoint."""
    return hf_io.save_hf(
        model.params if params is None else params,
        model.config,
        model.hf_config,
        out_dir,
        tokenizer=model.tokenizer,
        source_dir=model.source_dir,
    )
