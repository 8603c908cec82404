"""Reading and writing safetensors checkpoints tensor by tensor.

Reads go through `safetensors.safe_open`, which memory-maps the file, so a tensor (or one
device's slice of it) is read without ever holding the whole checkpoint in host memory.
Every failure names the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from harmjax.errors import CheckpointError, MissingFileError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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
        with _open(single_path) as f:
            return {name: single_path for name in f.keys()}
    present = sorted(os.listdir(directory))
    raise MissingFileError(
        f"No safetensors weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE}, "
        f"found {present}. (PyTorch .bin checkpoints are not read; convert them to safetensors.)"
    )


def _open(path: str):
    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # safetensors raises its own SafetensorError / OSError variants.
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise CheckpointError(
            f"Cannot read safetensors file {path} ({size} bytes): {e}. "
            "The file is truncated or corrupt; download it again."
        ) from e


class TensorReader:
    """Lazy access to the tensors of a safetensors checkpoint directory.

    Use as a context manager. `shape(name)` and `dtype(name)` read only headers;
    `read(name, index)` reads one slice (a tuple of Python slices), or the whole tensor when
    `index` is None.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self._files = checkpoint_files(directory)
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._handles.clear()

    def names(self) -> list[str]:
        """All tensor names in the checkpoint."""
        return list(self._files)

    def _handle(self, name: str):
        if name not in self._files:
            raise CheckpointError(f"Tensor {name!r} is not in the checkpoint at {self.directory}.")
        path = self._files[name]
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(_open(path))
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file header."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """Reads a tensor, or only the slice `index` of it, as a NumPy array."""
        handle = self._handle(name)
        try:
            if index is None:
                return handle.get_tensor(name)
            return handle.get_slice(name)[index]
        except Exception as e:
            raise CheckpointError(
                f"Cannot read tensor {name!r} from {self._files[name]}: {e}. "
                "The file is truncated or corrupt; download it again."
            ) from e


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
