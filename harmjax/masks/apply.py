"""Applying a mask to params: pruned weights become zero (or alpha * w), nothing else changes."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harmjax.masks.algebra import MaskMismatchError
from harmjax.tree import iter_leaves


def check_mask_fits(params: Mapping[str, Any], mask: Mapping[str, Any]) -> None:
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
    params: Mapping[str, Any], mask: Mapping[str, Any], alpha: float = 0.0, donate: bool = False
) -> dict[str, Any]:
    """New params with every weight where `mask` is True set to alpha * w (0 by default).

    Leaves absent from the mask are the same objects as in `params`; masked leaves keep
    their dtype and sharding; an all-False mask returns weights bit-identical to the input.
    `donate=True` lets the masked leaves' old buffers be reused (the input params must not
    be used afterwards), so pruning an 8B model does not hold two copies of its weights.
    Raises MaskMismatchError (see `check_mask_fits`) when the mask does not fit.
    """
    check_mask_fits(params, mask)
    flat_mask = dict(iter_leaves(mask))
    zero = float(alpha) == 0.0

    def rebuild(node: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        out = {}
        for key, value in node.items():
            name = prefix + key
            if isinstance(value, Mapping):
                out[key] = rebuild(value, name + ".")
            elif name in flat_mask:
                sharding = value.sharding if isinstance(value, jax.Array) else None
                m = _colocate(flat_mask[name], sharding)
                out[key] = _masker(sharding, zero, donate)(value, m, np.float32(alpha))
            else:
                out[key] = value
        return out

    return rebuild(params, "")
