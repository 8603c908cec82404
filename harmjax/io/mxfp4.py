"""MXFP4 expert weights (published gpt-oss checkpoints) dequantized on load.

A quantized tensor `X` is stored as `X_blocks` (uint8, (experts, rows, groups, 16): two FP4
E2M1 values per byte, low nibble first) and `X_scales` (uint8, (experts, rows, groups): a
power-of-two exponent biased by 127 per group of 32 values). Dequantized, it is the plain
`X` of shape (experts, groups * 32, rows), as transformers' `convert_moe_packed_tensors`
produces it, so the params tree, scores, masks and exports all use the plain names. An export
writes the dequantized tensors under the plain names (as transformers' dequantized save does).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The 16 FP4 (E2M1) code points, indexed by the 4-bit code.
FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32
)
_BLOCKS, _SCALES = "_blocks", "_scales"


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 (experts, groups * 32, rows) from MXFP4 blocks (experts, rows, groups, 16) and
    scales (experts, rows, groups)."""
    blocks = np.asarray(blocks, np.uint8)
    exponents = np.asarray(scales).astype(np.int32) - 127
    if blocks.shape[:-1] != exponents.shape:
        raise ValueError(f"MXFP4 blocks {blocks.shape} do not match scales {exponents.shape}.")
    values = np.stack([FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], axis=-1)
    values = values.reshape(*blocks.shape[:-1], blocks.shape[-1] * 2)
    values = np.ldexp(values, exponents[..., None]).astype(np.float32)
    experts, rows = blocks.shape[:2]
    return values.reshape(experts, rows, -1).swapaxes(1, 2)


def packed_pairs(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, str]]:
    """plain name -> (blocks name, scales name) for every MXFP4 pair among a file's tensors."""
    return {
        n[: -len(_BLOCKS)]: (n, n[: -len(_BLOCKS)] + _SCALES)
        for n in shapes
        if n.endswith(_BLOCKS) and n[: -len(_BLOCKS)] + _SCALES in shapes
    }


def plain_shapes(shapes: dict[str, tuple[int, ...]], pairs: dict[str, tuple[str, str]]) -> dict[str, tuple[int, ...]]:
    """The tensor shapes with each MXFP4 pair replaced by its dequantized tensor's shape."""
    packed = {n for pair in pairs.values() for n in pair}
    out = {n: s for n, s in shapes.items() if n not in packed}
    for plain, (blocks, _) in pairs.items():
        experts, rows, groups, width = shapes[blocks]
        out[plain] = (experts, groups * width * 2, rows)
    return out


def read_dequantized(reader: Any, pair: tuple[str, str], index: tuple[slice, ...] | None, dtype: Any) -> np.ndarray:
    """The slice `index` of a dequantized tensor; only the experts the slice covers are read."""
    blocks_name, scales_name = pair
    experts = index[0] if index else slice(None)
    blocks = reader.read(blocks_name, (experts,))
    scales = reader.read(scales_name, (experts,))
    out = dequantize(blocks, scales)
    if index:
        out = out[(slice(None),) + tuple(index[1:])]
    return np.asarray(out, dtype=dtype)
