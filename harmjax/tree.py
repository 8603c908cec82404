"""Conversions between HF's flat tensor names and harmjax's nested params pytree.

`model.layers.3.mlp.down_proj.weight` is `params["model"]["layers"]["3"]["mlp"]["down_proj"]["weight"]`.
Any tree with the params' structure (scores, gradients, masks, shardings) converts the same way.

Nested dicts go through `flax.traverse_util` (insertion order kept, so HF's parameter order
survives a round trip). Other pytrees, such as a Flax NNX `State` or a linen `FrozenDict`
of a model that is not harmjax's, are named by their JAX key paths (`path_name`), so the
same dotted names serve scores, masks and `apply_mask` for them too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
from flax import traverse_util


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nests a {"a.b.c": leaf} mapping into {"a": {"b": {"c": leaf}}}."""
    return traverse_util.unflatten_dict(dict(flat), sep=".")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flattens a nested dict into {"a.b.c": leaf}; the inverse of `unflatten`."""
    return dict(iter_leaves(tree, prefix))


def path_name(path: tuple) -> str:
    """The dotted name of a JAX key path: dict keys, attribute names and sequence indices
    joined by ".", without the trailing `.value` of a Flax NNX Variable (so an NNX state's
    `layers.0.kernel` is named like the module attribute a user knows)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        else:  # FlattenedIndexKey and custom keys
            parts.append(str(getattr(key, "key", key)).strip("[]."))
    if len(parts) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def iter_leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yields (dotted name, leaf) pairs: nested dicts in insertion order, any other pytree
    (NNX State, FrozenDict, dataclasses) in JAX's flattening order, named by `path_name`."""
    if isinstance(tree, dict):
        for key, leaf in traverse_util.flatten_dict(tree, sep=".").items():
            yield prefix + key, leaf
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield prefix + path_name(path), leaf
