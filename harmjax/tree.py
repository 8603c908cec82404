"""Conversions between HF's flat tensor names and harmjax's nested params pytree.

`model.layers.3.mlp.down_proj.weight` is `params["model"]["layers"]["3"]["mlp"]["down_proj"]["weight"]`.
Any tree with the params' structure (scores, gradients, masks, shardings) converts the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nests a {"a.b.c": leaf} mapping into {"a": {"b": {"c": leaf}}}."""
    tree: dict[str, Any] = {}
    for name, leaf in flat.items():
        node = tree
        *parents, last = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flattens a nested dict into {"a.b.c": leaf}; the inverse of `unflatten`."""
    return dict(iter_leaves(tree, prefix))


def iter_leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yields (dotted name, leaf) pairs in insertion order."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from iter_leaves(value, name + ".")
        else:
            yield name, value
