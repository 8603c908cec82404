"""Converting a llama.cpp GGUF file into an ordinary Hugging Face checkpoint directory.

A GGUF file carries everything a Hugging Face checkpoint does (weights, config, tokenizer, chat
template) but in llama.cpp's layout: quantized blocks, its own tensor and metadata names, and
Q/K projection rows permuted for its rotary kernel. `gguf_to_hf_dir` undoes all of that with
NumPy and the `gguf`, `tokenizers` and `transformers` tokenizer libraries -- never torch -- and
writes `config.json`, `model.safetensors`, the tokenizer files and `generation_config.json`.

The output matches what transformers' own (torch-requiring) GGUF loader builds from the same
file: the same dequantized float32 tensors and a tokenizer that yields the same ids.

The steps live by topic: reading and dequantizing (`gguf_read`), llama names, shapes and
config (`gguf_llama`), the tokenizer (`gguf_tokenizer`); this module writes the directory.
Their public names are re-exported here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any

import ml_dtypes
import numpy as np
from gguf import GGUFReader

from harmjax.errors import CheckpointError, UnsupportedDtypeError
from harmjax.io.disk_space import require_free_space
from harmjax.io.gguf_llama import SUPPORTED_ARCHITECTURES, generation_config, hf_config, hf_tensor_name, hf_tensors, \
    llama_shape
from harmjax.io.gguf_read import open_gguf, read_metadata, unpermute_rows
from harmjax.io.gguf_tokenizer import build_tokenizer, bytes_to_unicode
from harmjax.io.safetensors_io import write_tensors

__all__ = [
    "CONVERSION_FILE",
    "CONVERTER_VERSION",
    "SUPPORTED_ARCHITECTURES",
    "build_tokenizer",
    "bytes_to_unicode",
    "gguf_to_hf_dir",
    "hf_tensor_name",
    "open_gguf",
    "read_metadata",
    "unpermute_rows",
]

logger = logging.getLogger(__name__)

# Written into every converted directory; lets a caller (harmjax.assets) tell a complete,
# current conversion from a stale one without re-reading the weights.
CONVERSION_FILE = "harmjax_conversion.json"
# Bump when the output of a conversion changes, so cached conversions are redone.
CONVERTER_VERSION = 1

_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def gguf_to_hf_dir(gguf_path: str, out_dir: str, dtype: str = "float32") -> str:
    """Converts a llama.cpp GGUF file into a Hugging Face checkpoint directory; returns its path.

    Writes `config.json`, `model.safetensors` (every tensor dequantized, then cast to `dtype`:
    "float32", "float16" or "bfloat16"), `tokenizer.json`, `tokenizer_config.json` (with the
    file's chat template), `generation_config.json` and `harmjax_conversion.json`.

    Everything is written to a temporary sibling directory that is renamed onto `out_dir` only
    when complete, so an interrupted conversion never leaves a half-written `out_dir`. An existing
    `out_dir` is replaced if it is empty or an earlier output of this function; any other
    existing directory is left alone and CheckpointError is raised.

    Raises MissingFileError (no such file), CheckpointError (not a GGUF file, truncated,
    unsupported quantization type or tokenizer, inconsistent shapes) and
    UnsupportedArchitectureError (not a llama model).
    """
    np_dtype = _numpy_dtype(dtype)
    reader = open_gguf(gguf_path)
    metadata = read_metadata(reader, gguf_path)
    shape = llama_shape(metadata, reader, gguf_path)
    # Everything that can fail on metadata alone fails here, before minutes of dequantizing.
    config = hf_config(metadata, shape, dtype, gguf_path)
    tokenizer = build_tokenizer(metadata, gguf_path)
    out_dir = os.path.abspath(out_dir)
    _check_replaceable(out_dir)
    require_free_space(
        os.path.dirname(out_dir), _converted_bytes(reader, np_dtype), f"Converting {gguf_path}",
        "Free some space, or convert to another directory (for harmjax's cache: set $HARMJAX_CACHE).",
    )

    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    # mkdtemp makes the directory private (0700); a checkpoint gets the usual permissions.
    os.chmod(tmp, 0o755)
    try:
        write_tensors(tmp, hf_tensors(reader, shape, np_dtype, gguf_path))
        _write_json(os.path.join(tmp, "config.json"), config)
        _write_json(os.path.join(tmp, "generation_config.json"), generation_config(config))
        _save_tokenizer(tokenizer, tmp)
        _write_json(os.path.join(tmp, CONVERSION_FILE), _conversion_record(gguf_path, dtype))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Converted %s to %s (%s).", gguf_path, out_dir, dtype)
    return out_dir


def _converted_bytes(reader: GGUFReader, np_dtype: np.dtype) -> int:
    """Bytes of model.safetensors once every tensor harmjax keeps is dequantized to `np_dtype`."""
    return sum(
        int(t.n_elements) * np.dtype(np_dtype).itemsize
        for t in reader.tensors
        if hf_tensor_name(t.name) is not None
    )


def _numpy_dtype(dtype: str) -> np.dtype:
    if dtype not in _DTYPES:
        raise UnsupportedDtypeError(
            f"Cannot write a converted checkpoint as {dtype!r}; choose one of {sorted(_DTYPES)}."
        )
    return np.dtype(_DTYPES[dtype])


def _conversion_record(gguf_path: str, dtype: str) -> dict[str, Any]:
    return {
        "converter_version": CONVERTER_VERSION,
        "source_file": os.path.basename(gguf_path),
        "source_bytes": os.path.getsize(gguf_path),
        "dtype": dtype,
    }


def _save_tokenizer(tokenizer: Any, directory: str) -> None:
    # The chat template goes into tokenizer_config.json (not only chat_template.jinja), where
    # every transformers version and simple readers look for it.
    tokenizer.save_pretrained(directory, save_jinja_files=False)
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    # transformers 5 writes "TokenizersBackend", a class 4.x lacks; it reads this name as the same.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(path, config)


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def _check_replaceable(out_dir: str) -> None:
    """Refuses to replace anything but an empty directory or an earlier conversion."""
    if not os.path.exists(out_dir):
        return
    if os.path.isdir(out_dir) and (
        not os.listdir(out_dir) or os.path.isfile(os.path.join(out_dir, CONVERSION_FILE))
    ):
        return
    raise CheckpointError(
        f"{out_dir} already exists and is not an earlier gguf_to_hf_dir output; refusing to "
        "replace it. Pass a new or empty output directory."
    )


def _replace_dir(tmp: str, out_dir: str) -> None:
    """Moves the finished `tmp` onto `out_dir`, keeping the old one until the new one is in place."""
    if not os.path.exists(out_dir):
        os.replace(tmp, out_dir)
        return
    trash = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
    old = os.path.join(trash, "old")
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(trash, ignore_errors=True)
