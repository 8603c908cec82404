"""Storing masks and scores: safetensors keyed by HF names, for JAX and PyTorch users alike.

A mask directory holds
  mask_indices.safetensors  per HF parameter name (`model.layers.0.self_attn.q_proj.weight`),
                      the sorted int64 flat indices of the pruned entries, row-major over the
                      HF (out, in) shape; shapes in the file's metadata. In PyTorch:
                      `w.data.view(-1)[idx] = 0` on the named weight.
  mask.safetensors    only with `dense=True`: the dense tree, bool stored as uint8 (a 32B
                      model's is 31 GB, where the sparse file of a q=1e-5 mask is ~2.5 MB)
  summary.json        model, data, nsamples, seed, kind, p, q, granularity, counts per layer
                      and projection, fraction pruned, harmjax version
Older mask directories (`mask/` orbax and/or a dense `mask.safetensors`) still load.

A score directory holds `scores/` (orbax), `scores.safetensors` and `summary.json` (dense
float32 trees), or, from the experiment's scores stage, `candidates.safetensors`: per matrix
the top entries in `select`'s ranking order (see `harmjax.masks.sparse`).

The safetensors file is written by a streaming writer: the header is computed from shapes
alone, then each leaf is gathered to the host and appended, so at most one leaf is ever in
host memory (an 8B model's float32 score tree is 28 GB).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from harmjax import checkpoint, distributed
from harmjax.distributed import to_host as _to_host  # gathers arrays that span processes
from harmjax.errors import CheckpointError, MissingFileError
from harmjax.io.safetensors_io import read_header
from harmjax.masks.algebra import MaskMismatchError, check_bool, counts_summary, hf_order_key, param_count
from harmjax.masks.apply import check_mask_fits
from harmjax.masks.groups import expert_groups
from harmjax.tree import iter_leaves, unflatten

SUMMARY_FILE = "summary.json"
_BOOL_KEY = "harmjax_bool_tensors"  # safetensors metadata: JSON list of names stored as uint8 from bool
_CODES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8",
    np.dtype(np.uint16): "U16", np.dtype(np.uint32): "U32", np.dtype(np.uint64): "U64",
}
_DTYPES = {code: dtype for dtype, code in _CODES.items()} | {"BOOL": np.dtype(np.bool_)}  # BOOL: read only


def export_safetensors(
    tree: Mapping[str, Any], path: str, metadata: Mapping[str, str] | None = None, progress: bool = True
) -> str:
    """Writes any params-shaped tree as one safetensors file keyed by dotted HF names.

    Bool leaves are stored as uint8 (0/1) and listed in the file's metadata so that
    `load_safetensors_tree` gives bools back. Works on sharded and multi-host arrays (process
    0 writes; every process must call it). Written to a temporary file and renamed, so a
    killed job never leaves a truncated file under `path`. Returns `path`.
    """
    leaves = list(iter_leaves(tree))
    header: dict[str, Any] = {}
    bools = []
    offset = 0
    for name, leaf in leaves:
        dtype = np.dtype(leaf.dtype)
        if dtype == np.bool_:
            bools.append(name)
            dtype = np.dtype(np.uint8)
        if dtype not in _CODES:
            raise ValueError(f"Leaf {name!r} has dtype {dtype}, which safetensors export does not support.")
        nbytes = int(np.prod(leaf.shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(leaf.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    if bools:
        meta[_BOOL_KEY] = json.dumps(bools)
    header["__metadata__"] = meta
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned

    writer = distributed.is_writer()
    tmp = path + ".tmp"
    f = None
    if writer:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        f = open(tmp, "wb")
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
    try:
        for name, leaf in tqdm(leaves, desc=f"write {os.path.basename(path)}", disable=not progress, leave=False):
            host = np.ascontiguousarray(_to_host(leaf))
            if writer:
                f.write((host.view(np.uint8) if host.dtype == np.bool_ else host).data)
    finally:
        if f is not None:
            f.close()
    if writer:
        os.replace(tmp, path)
    distributed.barrier(f"exported {path}")
    return path


def _read_metadata(path: str) -> dict[str, str]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)).get("__metadata__", {}) or {}


def safetensors_shapes(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of a safetensors file from its header alone (bool for leaves
    that were exported as masks)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"No safetensors file at {path}.")
    header, _ = read_header(path)
    bools = set(json.loads(_read_metadata(path).get(_BOOL_KEY, "[]")))
    return {
        name: (tuple(e["shape"]), np.dtype(np.bool_) if name in bools else np.dtype(_DTYPES[e["dtype"]]))
        for name, e in header.items()
    }


def load_safetensors_tree(path: str, shardings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Reads a safetensors file written by `export_safetensors` back into a nested tree.

    Leaves exported from bool come back as bool. Without `shardings` leaves are NumPy
    arrays; with a tree of shardings (e.g. `harmjax.param_shardings(config, mesh)`, matched
    by name) each leaf becomes a jax.Array placed straight into its sharding, every device
    reading only its slice of the memory-mapped file.
    """
    if not os.path.isfile(path):
        raise MissingFileError(f"No safetensors file at {path}.")
    header, data_start = read_header(path)  # validates offsets against the file size
    bools = set(json.loads(_read_metadata(path).get(_BOOL_KEY, "[]")))
    flat_shardings = dict(iter_leaves(shardings)) if shardings is not None else {}
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, entry in header.items():
        if entry["dtype"] not in _DTYPES:
            raise CheckpointError(f"Tensor {name!r} in {path} has unsupported dtype {entry['dtype']!r}.")
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        shape = tuple(entry["shape"])
        view = np.ndarray(shape, dtype, buffer=mapped, offset=data_start + entry["data_offsets"][0])
        as_bool = name in bools

        def read(index=(), view=view, as_bool=as_bool):
            part = np.array(view[index])
            return part.astype(np.bool_) if as_bool else part

        sharding = flat_shardings.get(name)
        out[name] = read() if sharding is None else jax.make_array_from_callback(shape, sharding, read)
    del mapped
    return unflatten(out)


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (tuple, set)):
        return list(x)
    return str(x)


def _version() -> str:
    from harmjax import __version__

    return __version__


def _write_summary(out_dir: str, summary: Mapping[str, Any]) -> None:
    """Process 0 writes summary.json (the mark of a complete directory); every process calls
    this and waits until it exists, so any process may read the directory next."""
    if distributed.is_writer():
        path = os.path.join(out_dir, SUMMARY_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=2, default=_jsonable)
        os.replace(path + ".tmp", path)
    distributed.barrier(f"summary {out_dir}")


def read_summary(out_dir: str) -> dict[str, Any]:
    """The summary.json of a mask or score directory ({} if it has none)."""
    path = os.path.join(out_dir, SUMMARY_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}).") from e


def _save_dir(out_dir: str, stem: str, tree: Mapping[str, Any], summary: dict[str, Any], safetensors: bool = True) -> str:
    os.makedirs(out_dir, exist_ok=True)
    summary = json.loads(json.dumps(summary, default=_jsonable))  # orbax metadata must be plain JSON
    checkpoint.save_tree(os.path.join(out_dir, stem), tree, metadata=summary)
    if safetensors:
        export_safetensors(tree, os.path.join(out_dir, f"{stem}.safetensors"), metadata={"harmjax_kind": stem})
    _write_summary(out_dir, summary)  # last: its presence marks a complete directory (a barrier)
    return out_dir


def _load_dir(out_dir: str, stem: str, shardings: Mapping[str, Any] | None) -> dict[str, Any]:
    """Restores `out_dir/stem` (orbax) or, failing that, `out_dir/stem.safetensors`."""
    orbax_dir = os.path.join(out_dir, stem)
    st_path = os.path.join(out_dir, f"{stem}.safetensors")
    if os.path.isdir(orbax_dir):
        target = None
        if shardings is not None and os.path.isfile(st_path):
            # Shapes from the safetensors header (cheap); restore straight into the shardings.
            flat_sh = dict(iter_leaves(shardings))
            default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            target = unflatten({
                name: jax.ShapeDtypeStruct(shape, dtype, sharding=flat_sh.get(name) or default)
                for name, (shape, dtype) in safetensors_shapes(st_path).items()
            })
        tree = checkpoint.restore_tree(orbax_dir, target)
        if shardings is not None and target is None:
            flat_sh = dict(iter_leaves(shardings))
            tree = unflatten({n: jax.device_put(x, flat_sh[n]) if n in flat_sh else x for n, x in iter_leaves(tree)})
        return tree
    if os.path.isfile(st_path):
        return load_safetensors_tree(st_path, shardings)
    present = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else None
    raise MissingFileError(
        f"No {stem} in {out_dir}: expected {stem}/ (orbax) or {stem}.safetensors"
        + (f", found {present}." if present is not None else "; the directory does not exist.")
    )


SPARSE_MASK_FILE = "mask_indices.safetensors"
CANDIDATES_FILE = "candidates.safetensors"
_GROUPS_KEY = "selection_units"  # summary.json: how a MoE model's candidates were ranked
GROUPED = "expert groups"  # its value since experts of a layer are ranked together
_SHAPES_KEY = "harmjax_shapes"  # safetensors metadata: JSON {name: shape} of the matrices indexed


def _write_sparse(path: str, arrays: Mapping[str, np.ndarray], shapes: Mapping[str, Any], kind: str) -> None:
    meta = {"harmjax_kind": kind, _SHAPES_KEY: json.dumps({n: [int(d) for d in s] for n, s in shapes.items()})}
    export_safetensors(dict(arrays), path, metadata=meta, progress=False)


def _read_sparse(path: str) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    from harmjax.tree import flatten

    meta = _read_metadata(path)
    if _SHAPES_KEY not in meta:
        raise CheckpointError(f"{path} has no {_SHAPES_KEY!r} metadata; it was not written by harmjax's sparse writer.")
    shapes = {n: tuple(s) for n, s in json.loads(meta[_SHAPES_KEY]).items()}
    return flatten(load_safetensors_tree(path)), shapes


def save_mask(
    out_dir: str,
    mask: Mapping[str, Any],
    summary: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    num_params: int | None = None,
    dense: bool = False,
) -> str:
    """Writes a mask directory (`mask_indices.safetensors`, `summary.json`); returns `out_dir`.
    `dense=True` adds `mask.safetensors`, the dense uint8 copy (one byte per scored weight:
    6.5 GiB at 8B, 29 GiB at 32B, so only on request).

    `summary` (model, data, nsamples, seed, p, q, granularity, ...) is completed with
    `kind` ("mask" unless given), `counts` (`mask_counts`), `fraction_pruned` (of scored
    weights), `fraction_pruned_params` (of all parameters, when `params` or `num_params` is
    given) and `harmjax_version`.
    """
    from harmjax.masks.sparse import mask_indices

    check_bool(mask, "Mask")
    if params is not None:
        num_params = param_count(params)
    shapes = {name: tuple(leaf.shape) for name, leaf in iter_leaves(mask)}
    return save_mask_indices(out_dir, mask_indices(mask), shapes, summary, num_params=num_params,
                             dense=mask if dense else None)


def save_mask_indices(
    out_dir: str,
    indices: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    summary: Mapping[str, Any] | None = None,
    num_params: int | None = None,
    dense: Mapping[str, Any] | None = None,
) -> str:
    """`save_mask` for a mask given as sorted flat indices per HF name (`shapes` gives each
    matrix's shape): the same directory, made without a dense mask. `dense`, the same mask as
    a bool tree, is written as `mask.safetensors` when given. Returns `out_dir`."""
    names = sorted(shapes, key=hf_order_key)
    counts = counts_summary([(n, tuple(shapes[n]), len(indices.get(n, ()))) for n in names], num_params)
    full = {
        "kind": "mask",
        **dict(summary or {}),
        "counts": counts,
        "fraction_pruned": counts["fraction_scored"],
        "fraction_pruned_params": counts["fraction_params"],
        "harmjax_version": _version(),
    }
    full = json.loads(json.dumps(full, default=_jsonable))
    os.makedirs(out_dir, exist_ok=True)
    empty = np.zeros(0, np.int64)
    _write_sparse(os.path.join(out_dir, SPARSE_MASK_FILE),
                  {n: np.asarray(indices.get(n, empty), np.int64) for n in names}, shapes, "mask_indices")
    if dense is not None:
        export_safetensors(dense, os.path.join(out_dir, "mask.safetensors"), metadata={"harmjax_kind": "mask"})
    _write_summary(out_dir, full)  # last: its presence marks a complete directory
    return out_dir


def write_mask_indices(path: str, mask: Mapping[str, Any]) -> str:
    """Writes a bool mask tree as one sparse safetensors file (the format of
    `mask_indices.safetensors`: int64 flat indices per HF name, shapes in the metadata)."""
    from harmjax.masks.sparse import mask_indices

    shapes = {name: tuple(leaf.shape) for name, leaf in iter_leaves(mask)}
    _write_sparse(path, mask_indices(mask), shapes, "mask_indices")
    return path


def load_mask_indices(out_dir: str) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    """({HF name: sorted int64 flat indices}, {HF name: shape}) of a mask directory, without
    building the dense mask when it is stored sparse (older dense directories are converted)."""
    path = os.path.join(out_dir, SPARSE_MASK_FILE)
    if os.path.isfile(path):
        return _read_sparse(path)
    from harmjax.masks.sparse import mask_indices

    mask, _ = load_mask(out_dir)
    return mask_indices(mask), {n: tuple(x.shape) for n, x in iter_leaves(mask)}


def load_mask(out_dir: str, params: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(mask, summary) from a directory written by `save_mask`.

    With `params`, the mask is restored into the weights' shardings (each device building
    its slice from the indices) and checked to fit them (MaskMismatchError otherwise). Older
    directories (`mask/` orbax, a dense `mask.safetensors`) and a directory holding only a
    dense `mask.safetensors` made in PyTorch (uint8 or bool) also load.
    """
    shardings = None
    if params is not None:
        shardings = unflatten({n: getattr(x, "sharding", None) for n, x in iter_leaves(params)
                               if isinstance(x, jax.Array)})
    sparse = os.path.join(out_dir, SPARSE_MASK_FILE)
    if os.path.isfile(sparse):
        from harmjax.masks.sparse import mask_from_indices

        indices, shapes = _read_sparse(sparse)
        mask = mask_from_indices(indices, shapes, shardings)
    else:
        mask = _load_dir(out_dir, "mask", shardings)
    flat = dict(iter_leaves(mask))
    for name, leaf in flat.items():
        if np.dtype(leaf.dtype) == np.uint8:  # written by other tools without our metadata
            flat[name] = leaf.astype(bool)
        elif np.dtype(leaf.dtype) != np.bool_:
            raise MaskMismatchError(f"Mask leaf {name!r} in {out_dir} has dtype {leaf.dtype}, expected bool or uint8.")
    mask = unflatten(flat)
    if params is not None:
        check_mask_fits(params, mask)
    return mask, read_summary(out_dir) or (checkpoint.read_metadata(os.path.join(out_dir, "mask"))
                                           if os.path.isdir(os.path.join(out_dir, "mask")) else {})


def save_scores(out_dir: str, scores: Mapping[str, Any], summary: Mapping[str, Any] | None = None,
                safetensors: bool = True) -> str:
    """Writes a score directory (`scores/`, `scores.safetensors`, `summary.json`); returns
    `out_dir`. `summary` should hold kind, model, data, nsamples, seed, text_format.
    `safetensors=False` skips the HF-named copy (for intermediate scores nobody exports)."""
    full = {**dict(summary or {}), "harmjax_version": _version()}
    return _save_dir(out_dir, "scores", scores, full, safetensors)


def load_scores(out_dir: str, shardings: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scores, summary) from a score directory (written by `save_scores` or `launch/score.py`).

    `shardings`: optional tree of shardings matched by name (e.g.
    `harmjax.param_shardings(config, mesh)`) to restore each score like its weight;
    without it the scores land on the default device.
    """
    scores = _load_dir(out_dir, "scores", shardings)
    return scores, read_summary(out_dir) or checkpoint.read_metadata(os.path.join(out_dir, "scores"))


def save_candidates(out_dir: str, candidates: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    shapes: Mapping[str, Any], summary: Mapping[str, Any] | None = None) -> str:
    """Writes score candidates (`harmjax.masks.sparse.top_candidates`) as a score directory:
    `candidates.safetensors` (per HF name `<name>.indices` int64 and `<name>.scores` float32,
    in ranking order; shapes in the metadata) and `summary.json`. Returns `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    summary = dict(summary or {})
    if expert_groups(shapes):
        summary[_GROUPS_KEY] = GROUPED  # the candidates are each expert group's top entries
    arrays = {}
    for name, (idx, values) in candidates.items():
        arrays[f"{name}.indices"] = np.asarray(idx, np.int64)
        arrays[f"{name}.scores"] = np.asarray(values, np.float32)
    _write_sparse(os.path.join(out_dir, CANDIDATES_FILE), arrays, shapes, "candidates")
    _write_summary(out_dir, {**summary, "harmjax_version": _version()})
    return out_dir


def has_candidates(out_dir: str) -> bool:
    """Whether a score directory holds sparse candidates (rather than a dense tree)."""
    return os.path.isfile(os.path.join(out_dir, CANDIDATES_FILE))


def load_candidates(out_dir: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, tuple[int, ...]],
                                           dict[str, Any]]:
    """(candidates, shapes, summary) from a directory written by `save_candidates`."""
    path = os.path.join(out_dir, CANDIDATES_FILE)
    if not os.path.isfile(path):
        raise MissingFileError(f"No {CANDIDATES_FILE} in {out_dir}.")
    arrays, shapes = _read_sparse(path)
    summary = read_summary(out_dir)
    if expert_groups(shapes) and summary.get(_GROUPS_KEY) != GROUPED:
        # Per-expert candidates from before grouped selection hold each expert's own top
        # entries, not its part of the group's: masks from them would be silently wrong.
        raise CheckpointError(f"The candidates in {out_dir} were selected per expert matrix, before MoE experts were "
                              "ranked together; rescore (delete the scores stage's directory).")
    cands = {n: (arrays[f"{n}.indices"], arrays[f"{n}.scores"]) for n in shapes}
    return cands, shapes, summary
