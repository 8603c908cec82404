"""Hugging Face checkpoints in and out: local directories, hub ids, and export.

Loading places each tensor straight into its target sharding: every device's slice is read
from the memory-mapped safetensors file by `jax.make_array_from_callback`, so no process
ever holds a full host copy of a large model. Export writes tensors one at a time into
safetensors shards that transformers loads.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from harmjax import distributed
from harmjax.config import ModelConfig
from harmjax.errors import CheckpointError, HubUnavailableError, MissingFileError, UnsupportedDtypeError
from harmjax.io.multimodal import text_tower_names
from harmjax.io import mxfp4
from harmjax.io.safetensors_io import TensorReader, write_tensors
from harmjax.model.param_specs import param_specs
from harmjax.sharding import param_shardings
from harmjax.tree import iter_leaves, unflatten

SUPPORTED_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Files of a checkpoint directory that are copied through on export, besides weights/config.
_TOKENIZER_AND_GENERATION_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)

# Tensors placed concurrently while loading (each holds at most one tensor's slices in memory).
_LOAD_THREADS = 8

# Tensors some checkpoints carry that the decoder recomputes or ties; ignored on load.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_dtype(dtype: Any, hf_config: dict[str, Any] | None = None) -> jnp.dtype:
    """The compute dtype from a name, a dtype, or (when None) the checkpoint's own dtype."""
    if dtype is None:
        name = (hf_config or {}).get("dtype") or (hf_config or {}).get("torch_dtype") or "float32"
        return jnp.dtype(SUPPORTED_DTYPES.get(str(name), jnp.float32))
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in SUPPORTED_DTYPES:
        raise UnsupportedDtypeError(
            f"dtype {dtype!r} is not supported for parameters; use one of {sorted(SUPPORTED_DTYPES)}."
        )
    return jnp.dtype(SUPPORTED_DTYPES[name])


def resolve_checkpoint(path_or_id: str) -> str:
    """A local path for `path_or_id`: an existing file/directory, or a hub id fetched (or found in
    the hub cache) through huggingface_hub."""
    expanded = os.path.expanduser(path_or_id)
    if os.path.exists(expanded):
        return expanded
    looks_local = (
        path_or_id.startswith(("/", ".", "~"))
        or path_or_id.endswith(".gguf")
        or path_or_id.count("/") != 1
    )
    if looks_local:
        raise MissingFileError(
            f"{path_or_id!r} does not exist. Pass a Hugging Face checkpoint directory, a .gguf "
            "file, or a hub id of the form 'org/name'."
        )
    return _snapshot_download(path_or_id)


def _snapshot_download(repo_id: str) -> str:
    import huggingface_hub

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"]
    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:  # offline, gated, missing repo: one clear message for all.
        raise HubUnavailableError(
            f"Could not fetch {repo_id!r} from the Hugging Face hub and it is not in the local "
            f"hub cache ({type(e).__name__}: {e}). There is no local directory of that name "
            "either. Download the checkpoint where the hub is reachable and pass its directory."
        ) from e


def read_config_json(directory: str) -> dict[str, Any]:
    """The raw config.json dict of a checkpoint directory."""
    if not os.path.isdir(directory):
        raise MissingFileError(f"Checkpoint directory {directory} does not exist.")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise MissingFileError(
            f"No config.json in {directory}; a Hugging Face checkpoint directory needs config.json "
            f"beside its safetensors files (found {sorted(os.listdir(directory))})."
        )
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}.") from e


def check_tensor_names(
    found: dict[str, tuple[int, ...]], config: ModelConfig, where: str
) -> list[str]:
    """Checks a checkpoint's tensor names and shapes against the config; returns names to load.

    Fails loudly on missing tensors, unexpected tensors and shape mismatches, naming each.
    """
    specs = param_specs(config)
    expected = set(specs)
    extra = {
        n for n in found
        if n not in expected
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and config.tie_word_embeddings)
    }
    missing = expected - set(found)
    problems = []
    if missing:
        problems.append(f"missing tensors {sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unexpected tensors {sorted(extra)[:8]}{' ...' if len(extra) > 8 else ''}")
    for name in sorted(expected & set(found)):
        if tuple(found[name]) != specs[name].shape:
            problems.append(f"{name} has shape {tuple(found[name])}, config implies {specs[name].shape}")
    if problems:
        raise CheckpointError(
            f"Checkpoint {where} does not match its config ({config.model_type}, "
            f"{config.num_layers} layers): " + "; ".join(problems[:6])
        )
    return list(specs)


def load_params(directory: str, config: ModelConfig, dtype: Any, mesh: Mesh) -> dict[str, Any]:
    """Loads the params pytree from safetensors, each tensor placed straight into its sharding."""
    from tqdm.auto import tqdm

    dtype = resolve_dtype(dtype)
    shardings = dict(iter_leaves(param_shardings(config, mesh)))
    flat = {}
    # Copying a slice out of the memory map (NumPy) and onto a device (XLA) both release the
    # GIL, so a few threads overlap page-cache reads with host-to-device copies. Reading every
    # shape first opens all files in this thread; workers only read.
    with TensorReader(directory) as reader, ThreadPoolExecutor(max_workers=_LOAD_THREADS) as pool:
        in_file = text_tower_names(reader.names())  # params name -> name in the file
        shapes = {name: reader.shape(stored) for name, stored in in_file.items()}
        packed = mxfp4.packed_pairs(shapes)  # gpt-oss MXFP4 experts: dequantized on load
        shapes = mxfp4.plain_shapes(shapes, packed)
        names = check_tensor_names(shapes, config, directory)
        futures = {
            pool.submit(_place, reader, in_file.get(name, name), shapes[name], dtype, shardings[name],
                        packed.get(name)): name
            for name in names
        }
        for future in tqdm(as_completed(futures), total=len(futures), desc="loading tensors", unit="tensor", leave=False):
            flat[futures[future]] = future.result()
    return unflatten({name: flat[name] for name in names})


def _place(reader: TensorReader, name: str, shape, dtype, sharding, packed=None) -> jax.Array:
    cache: dict[Any, np.ndarray] = {}

    def read_slice(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in cache:  # replicated shards ask for the same slice once per device
            if packed is None:
                cache[key] = reader.read(name, tuple(index), dtype)
            else:
                cache[key] = mxfp4.read_dequantized(reader, packed, tuple(index), dtype)
        return cache[key]

    return jax.make_array_from_callback(tuple(shape), sharding, read_slice)


def _host_tensors(params: dict[str, Any], config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, host array) one tensor at a time, in HF's order."""
    from jax.experimental import multihost_utils

    flat = dict(iter_leaves(params))
    for name in param_specs(config):
        leaf = flat[name]
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            # Multi-host: every process takes part in the gather; process 0 writes.
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        yield name, np.asarray(jax.device_get(leaf))


def save_hf(
    params: dict[str, Any],
    config: ModelConfig,
    hf_config: dict[str, Any],
    out_dir: str,
    tokenizer: Any = None,
    source_dir: str | None = None,
    max_shard_bytes: int = 4 * 2**30,
) -> str:
    """Writes a transformers-loadable checkpoint directory: config, safetensors, tokenizer.

    Tensors keep HF names and orientation, so the export equals the source tensor for tensor
    (up to the dtype the params were loaded in). Tokenizer and generation files are copied
    from `source_dir` when given, else the tokenizer object is saved.
    """
    hf = config_for_params(hf_config, params, config)
    tensors = _host_tensors(params, config)
    if not distributed.is_writer():
        for _ in tensors:  # join the gathers, write nothing
            pass
    else:
        write_tensors(out_dir, tensors, max_shard_bytes=max_shard_bytes)
        write_config_and_tokenizer(hf, out_dir, tokenizer, source_dir)
        logging.info("Wrote HF checkpoint to %s", out_dir)
    distributed.barrier(f"saved {out_dir}")  # every process can read the export on return
    return out_dir


def config_for_params(hf_config: dict[str, Any], params: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """A copy of config.json that states the dtype the params are actually in."""
    hf = dict(hf_config)
    dtype = jnp.dtype(jax.tree.leaves(params)[0].dtype).name
    # transformers 5 writes "dtype", 4.x "torch_dtype": update whichever the config has.
    for key in [k for k in ("dtype", "torch_dtype") if k in hf] or ["dtype"]:
        hf[key] = dtype
    hf["tie_word_embeddings"] = config.tie_word_embeddings
    # MXFP4 experts were dequantized on load and are written plain (harmjax.io.mxfp4).
    hf.pop("quantization_config", None)
    return hf


def write_config_and_tokenizer(
    hf_config: dict[str, Any], out_dir: str, tokenizer: Any = None, source_dir: str | None = None
) -> None:
    """Writes config.json and copies tokenizer/generation files from `source_dir` (or saves
    `tokenizer` when the source has none). Only process 0 writes; callers that let other
    processes read the files next wait at a barrier."""
    if not distributed.is_writer():
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    copied = False
    if source_dir and os.path.isdir(source_dir):
        for fname in _TOKENIZER_AND_GENERATION_FILES:
            src = os.path.join(source_dir, fname)
            dst = os.path.join(out_dir, fname)
            if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(dst):
                shutil.copyfile(src, dst)
                copied = copied or fname.startswith("tokenizer")
    if tokenizer is not None and not copied:
        tokenizer.save_pretrained(out_dir)
