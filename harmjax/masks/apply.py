"""Applying a mask to params: pruned weights become zero (or alpha * w), nothing else changes."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harmjax.masks.algebra import MaskMismatchError
from harmjax.tree import iter_leaves, path_name


def check_mask_fits(params: Any, mask: Mapping[str, Any]) -> None:
    """Raises MaskMismatchError unless every leaf of `mask` is a bool array at a path of
    `params` with the same shape; the message names the first bad path and both shapes."""
    flat_params = dict(iter_leaves(params))
    for name, m in iter_leaves(mask):
        if name not in flat_params:
            near = [n for n in flat_params if n.rsplit(".", 1)[0] == name.rsplit(".", 1)[0]]
            hint = f" (params have {near} there)" if near else ""
            raise MaskMismatchError(
                f"Mask path {name!r} is not a parameter of the model{hint}; "
                "was the mask made for another model?"
            )
        expected, actual = tuple(np.shape(flat_params[name])), tuple(np.shape(m))
        if expected != actual:
            raise MaskMismatchError(
                f"Mask leaf {name!r} has shape {actual}, but the parameter has shape {expected}; "
                "was the mask made for another model?"
            )
        if np.dtype(m.dtype) != np.bool_:
            raise MaskMismatchError(
                f"Mask leaf {name!r} has dtype {m.dtype}, expected bool "
                "(convert a 0/1 array with `x.astype(bool)`)."
            )


def _masked(w, m, alpha, zero):
    # alpha * w in float32 then back to w's dtype, so bf16 weights are scaled accurately;
    # with alpha == 0 the pruned weights are exactly +0 (not -0 or NaN for infinite w).
    scaled = jnp.zeros_like(w) if zero else (w.astype(jnp.float32) * alpha).astype(w.dtype)
    return jnp.where(m, scaled, w)


@functools.lru_cache(maxsize=None)
def _masker(sharding, zero: bool, donate: bool):
    fn = functools.partial(_masked, zero=zero)
    kwargs = {"donate_argnums": (0,)} if donate else {}
    if sharding is not None:
        kwargs["out_shardings"] = sharding
    return jax.jit(fn, **kwargs)


def _colocate(m: Any, sharding: Any) -> Any:
    """A mask leaf on other devices than its weight (e.g. loaded onto one device while the
    model is sharded) is moved to the weight's sharding; jit rejects mixed device sets."""
    if sharding is not None and isinstance(m, jax.Array) and m.sharding.device_set != sharding.device_set:
        return jax.device_put(m, sharding)
    return m


def apply_mask(
    params: Any, mask: Mapping[str, Any], alpha: float = 0.0, donate: bool = False
) -> Any:
    """New params with every weight where `mask` is True set to alpha * w (0 by default).

    `params` is harmjax's nested dict, or any pytree whose leaves the mask names by dotted
    key path (see `harmjax.tree.path_name`): a Flax NNX `State` comes back as a `State`.

    Leaves absent from the mask are the same objects as in `params`; masked leaves keep
    their dtype and sharding; an all-False mask returns weights bit-identical to the input.
    `donate=True` lets the masked leaves' old buffers be reused (the input params must not
    be used afterwards), so pruning an 8B model does not hold two copies of its weights.
    Raises MaskMismatchError (see `check_mask_fits`) when the mask does not fit.
    """
    check_mask_fits(params, mask)
    flat_mask = dict(iter_leaves(mask))
    zero = float(alpha) == 0.0

    def masked(name: str, value: Any) -> Any:
        if name not in flat_mask:
            return value
        sharding = value.sharding if isinstance(value, jax.Array) else None
        m = _colocate(flat_mask[name], sharding)
        return _masker(sharding, zero, donate)(value, m, np.float32(alpha))

    if not isinstance(params, dict):
        # Any other pytree (a Flax NNX State, a FrozenDict, a user's dataclass) keeps its own
        # type; leaves are matched by their dotted key paths, as the mask was named.
        return jax.tree_util.tree_map_with_path(lambda path, x: masked(path_name(path), x), params)

    def rebuild(node: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        # Plain dicts are rebuilt in their own key order (jax.tree.map would sort the keys,
        # and HF's parameter order matters to exports).
        return {
            key: rebuild(value, prefix + key + ".") if isinstance(value, dict) else masked(prefix + key, value)
            for key, value in node.items()
        }

    return rebuild(params, "")
