"""Reading a llama.cpp GGUF file: opening it, its metadata as Python values, and its tensors
dequantized to float32 NumPy arrays with llama.cpp's Q/K row permutation undone. Part of
`harmjax.io.gguf`'s conversion; NumPy and the `gguf` library only, never torch."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from harmjax.errors import CheckpointError, MissingFileError


def open_gguf(gguf_path: str) -> GGUFReader:
    """Opens a GGUF file (memory-mapped), raising MissingFileError or CheckpointError."""
    if not os.path.isfile(gguf_path):
        raise MissingFileError(
            f"GGUF file {gguf_path} does not exist. Check the path, or download the .gguf file."
        )
    try:
        return GGUFReader(gguf_path)
    except Exception as e:  # gguf raises ValueError, IndexError, OSError... on a bad file.
        size = os.path.getsize(gguf_path)
        raise CheckpointError(
            f"Cannot read {gguf_path} ({size} bytes) as a GGUF file: {e}. The file is not a "
            "GGUF file or is truncated; download it again."
        ) from e


def read_metadata(reader: GGUFReader, gguf_path: str) -> dict[str, Any]:
    """The GGUF key/value metadata as plain Python values (str, int, float, bool, list)."""
    try:
        return {
            key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")
        }
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"Cannot decode the metadata of {gguf_path}: {e}. The file is corrupt; download it again."
        ) from e


def require_key(metadata: Mapping[str, Any], key: str, gguf_path: str) -> Any:
    """metadata[key], raising CheckpointError (an incomplete file) when the key is missing."""
    if key not in metadata:
        raise CheckpointError(
            f"{gguf_path} has no metadata key {key!r}, which a llama model needs. The file is "
            "incomplete; re-export it with a current llama.cpp convert_hf_to_gguf.py."
        )
    return metadata[key]


def token_id(metadata: Mapping[str, Any], key: str) -> int | None:
    """The token id stated as `tokenizer.ggml.<key>` (e.g. "bos_token_id"), or None."""
    value = metadata.get(f"tokenizer.ggml.{key}")
    return None if value is None else int(value)


def dequantize_tensor(tensor: Any, gguf_path: str) -> np.ndarray:
    """A GGUF tensor (of `GGUFReader.tensors`) as float32 in NumPy (HF) dimension order;
    CheckpointError for a type the gguf library cannot dequantize or a corrupt tensor."""
    type_name = GGMLQuantizationType(tensor.tensor_type).name
    try:
        array = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(
            f"Tensor {tensor.name!r} in {gguf_path} is stored as {type_name}, which the gguf "
            "library cannot dequantize. Use a GGUF quantized to a common type (F32, F16, BF16, "
            "Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)."
        ) from e
    except Exception as e:
        raise CheckpointError(
            f"Cannot dequantize tensor {tensor.name!r} ({type_name}) in {gguf_path}: {e}. "
            "The file is truncated or corrupt; download it again."
        ) from e
    return np.asarray(array, dtype=np.float32)


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (convert_hf_to_gguf.py `LlamaModel.permute`).

    llama.cpp interleaves the two rotary halves of each head, row-wise; Hugging Face keeps them
    as two contiguous halves. Rows are viewed as (heads, 2 halves interleaved, head_dim / 2) and
    the middle axes swapped back.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    grouped = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)
