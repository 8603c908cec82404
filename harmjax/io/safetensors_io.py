"""Reading and writing safetensors checkpoints tensor by tensor.

Reads parse the (simple, documented) safetensors header and memory-map each file with NumPy,
so a tensor, or one device's slice of it, is a view into the page cache: nothing is read
until it is copied, the copy releases the GIL (loading threads run in parallel, unlike the
`safetensors` package's reader), and no process ever holds the whole checkpoint. Writes use
the `safetensors` package. Every failure names the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from harmjax.errors import CheckpointError, MissingFileError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype codes -> NumPy dtypes (bfloat16 and float8 through ml_dtypes).
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER_BYTES = 100 * 2**20


def checkpoint_files(directory: str) -> dict[str, str]:
    """Maps each tensor name of a safetensors checkpoint directory to the file that holds it.

    Handles a single `model.safetensors` and a sharded checkpoint with
    `model.safetensors.index.json`. Raises MissingFileError when neither is present or a shard
    named by the index is missing.
    """
    index_path = os.path.join(directory, INDEX_FILE)
    single_path = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_path} is not a valid safetensors index ({e}).") from e
        files = {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
        missing = sorted({p for p in files.values() if not os.path.isfile(p)})
        if missing:
            raise MissingFileError(
                f"{index_path} names shard files that do not exist: {missing}. "
                "Download the complete checkpoint."
            )
        return files
    if os.path.isfile(single_path):
        return {name: single_path for name in read_header(single_path)[0]}
    present = sorted(os.listdir(directory))
    raise MissingFileError(
        f"No safetensors weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE}, "
        f"found {present}. (PyTorch .bin checkpoints are not read; convert them to safetensors.)"
    )


def read_header(path: str) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensor entries of a safetensors file and the byte offset where its data starts.

    Checks that every tensor's bytes lie inside the file, so a truncated download fails here
    with a message saying so rather than later with a bus error.
    """
    size = os.path.getsize(path)

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(
            f"Cannot read safetensors file {path} ({size} bytes): {why}. "
            "The file is truncated or corrupt; download it again."
        )

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt("shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER_BYTES, size - 8):
            raise corrupt(f"header length {length} does not fit in the file")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise corrupt(f"header is not valid JSON ({e})") from e
    header.pop("__metadata__", None)
    data_start = 8 + length
    for name, entry in header.items():
        if entry.get("dtype") not in _DTYPES:
            raise corrupt(f"tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        begin, end = entry["data_offsets"]
        expected = int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(_DTYPES[entry["dtype"]]).itemsize
        if end - begin != expected:
            raise corrupt(f"tensor {name!r} spans {end - begin} bytes, its shape needs {expected}")
        if data_start + end > size:
            raise corrupt(f"tensor {name!r} ends at byte {data_start + end}, past the end of the file")
    return header, data_start


class TensorReader:
    """Lazy access to the tensors of a safetensors checkpoint directory.

    Use as a context manager. `shape(name)` reads only headers; `read(name, index, dtype)`
    copies one slice (a tuple of slices) of a tensor, or all of it, out of the memory map.
    Safe to call from several threads once the files are open (`shape` of every tensor opens
    them all).
    """

    def __init__(self, directory: str):
        self.directory = directory
        self._files = checkpoint_files(directory)
        self._maps: dict[str, tuple[np.memmap, dict[str, dict[str, Any]], int]] = {}

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self._maps.clear()  # views never escape read(), so dropping the maps unmaps the files

    def names(self) -> list[str]:
        """All tensor names in the checkpoint."""
        return list(self._files)

    def _open(self, name: str):
        if name not in self._files:
            raise CheckpointError(f"Tensor {name!r} is not in the checkpoint at {self.directory}.")
        path = self._files[name]
        if path not in self._maps:
            header, data_start = read_header(path)
            self._maps[path] = (np.memmap(path, dtype=np.uint8, mode="r"), header, data_start)
        mapped, header, data_start = self._maps[path]
        if name not in header:
            raise CheckpointError(f"The index names {name!r} in {path}, but that file does not hold it.")
        return mapped, header[name], data_start

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file header."""
        return tuple(self._open(name)[1]["shape"])

    def read(self, name: str, index: tuple[slice, ...] | None = None, dtype: Any = None) -> np.ndarray:
        """Copies a tensor, or only the slice `index` of it, into a new array (cast to `dtype`)."""
        mapped, entry, data_start = self._open(name)
        begin = data_start + entry["data_offsets"][0]
        view = np.ndarray(tuple(entry["shape"]), _DTYPES[entry["dtype"]], buffer=mapped, offset=begin)
        if index is not None:
            view = view[tuple(index)]
        return np.array(view, dtype=dtype)


def write_tensors(
    directory: str,
    tensors: Mapping[str, np.ndarray] | Iterator[tuple[str, np.ndarray]],
    max_shard_bytes: int = 4 * 2**30,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Writes tensors as a safetensors checkpoint that transformers loads.

    One `model.safetensors` when everything fits in `max_shard_bytes`, otherwise numbered
    shards plus `model.safetensors.index.json`. `tensors` may be an iterator so that a large
    model is written shard by shard without holding all of it in host memory. Returns the
    written file paths.
    """
    os.makedirs(directory, exist_ok=True)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    meta = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    written: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        shard = shards[-1]
        if not shard:
            return
        tmp = os.path.join(directory, f"shard-{len(written):05d}.tmp")
        save_file(shard, tmp, metadata=meta)
        written.append(tmp)
        for name in shard:
            weight_map[name] = tmp
        shards[-1] = {}

    for name, array in items:
        array = np.ascontiguousarray(array)
        if shard_bytes and shard_bytes + array.nbytes > max_shard_bytes:
            flush()
            shard_bytes = 0
        shards[-1][name] = array
        shard_bytes += array.nbytes
        total += array.nbytes
    flush()

    # Name the shards once their count is known, as transformers expects.
    if len(written) == 1:
        final = os.path.join(directory, SINGLE_FILE)
        os.replace(written[0], final)
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            os.remove(index_path)
        return [final]
    finals = []
    rename = {}
    for i, tmp in enumerate(written):
        final = os.path.join(directory, f"model-{i + 1:05d}-of-{len(written):05d}.safetensors")
        os.replace(tmp, final)
        rename[tmp] = os.path.basename(final)
        finals.append(final)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {name: rename[tmp] for name, tmp in weight_map.items()},
    }
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return finals
