"""The one module that talks to orbax: save and restore any pytree of arrays.

Params, masks, scores, score accumulators of resumable scans and fine-tuning state all go
through `save_tree` / `restore_tree`, so orbax API changes touch only this file. Restores
place every array straight into the sharding of the target (abstract) tree.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from harmjax import distributed
from harmjax.errors import MissingFileError

_META_FILE = "harmjax_meta.json"


def save_tree(path: str, tree: Any, metadata: dict[str, Any] | None = None, overwrite: bool = True) -> str:
    """Saves a pytree of jax/NumPy arrays to `path` (a directory orbax creates).

    `metadata` (JSON-serialisable) is stored beside the arrays and returned by `read_metadata`.
    Blocks until the write is complete, so a finished call is a finished checkpoint. In a
    multi-process job every process calls it (each saves its own shards; process 0 writes the
    metadata), and on return every process can read the checkpoint.
    """
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree, force=overwrite)
        ckptr.wait_until_finished()
    if metadata is not None and distributed.is_writer():
        tmp = os.path.join(path, _META_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)
        os.replace(tmp, os.path.join(path, _META_FILE))
    distributed.barrier(f"saved {path}")
    return path


def restore_tree(path: str, target: Any | None = None) -> Any:
    """Restores a pytree saved by `save_tree`.

    `target` is a tree of arrays or `jax.ShapeDtypeStruct`s (with `.sharding`) giving the
    structure, dtypes and shardings to restore into; None restores as saved (replicated on
    the default device).
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise MissingFileError(f"No checkpoint at {path}.")
    abstract = None
    if target is not None:
        abstract = jax.tree.map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            target,
        )
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, abstract)


def read_metadata(path: str) -> dict[str, Any]:
    """The metadata dict saved with a checkpoint ({} if none)."""
    meta = os.path.join(os.path.abspath(path), _META_FILE)
    if not os.path.isfile(meta):
        return {}
    with open(meta) as f:
        return json.load(f)


def abstract_params(config, mesh, dtype) -> Any:
    """ShapeDtypeStructs with shardings for a model's params: the restore target of a params
    checkpoint, built without allocating anything."""
    from harmjax.model.param_specs import param_specs
    from harmjax.sharding import param_shardings
    from harmjax.tree import iter_leaves, unflatten

    shardings = dict(iter_leaves(param_shardings(config, mesh)))
    return unflatten({
        name: jax.ShapeDtypeStruct(spec.shape, dtype, sharding=shardings[name])
        for name, spec in param_specs(config).items()
    })
