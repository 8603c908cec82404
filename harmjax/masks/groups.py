"""Selection units: which leaves granularity "matrix" ranks together.

A dense model's unit is each matrix. In a mixture-of-experts checkpoint with one leaf per expert
(Mixtral's `block_sparse_moe.experts.{e}.w1.weight`, Qwen3-MoE's `mlp.experts.{e}.gate_proj.weight`)
a layer's experts of one matrix kind form one unit, as if the file had fused them into gpt-oss'
single (E, ., .) tensor: T_q is the top floor(q x unit size) over the union of their entries, ties
broken by (expert index, row-major index), the fused tensor's flat order. Why: per-expert files
would otherwise give every expert the same floor(q x size) count, so the two storage layouts of
one architecture would select differently and the scores could not choose experts. Masks stay
keyed by the checkpoint's own per-expert names; only the ranking is shared.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from harmjax.model.moe_specs import expert_leaf


def selection_units(names: Iterable[str]) -> list[tuple[str, ...]]:
    """The selection units of these leaf names: one tuple per unit, a group's members sorted by
    expert index, units in the order of their first member in `names`. A name outside any
    expert group (every dense-model name) is a unit of its own."""
    units: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        leaf = expert_leaf(name)
        key, expert = leaf if leaf is not None else (name, 0)
        units.setdefault(key, []).append((expert, name))
    return [tuple(name for _, name in sorted(members)) for members in units.values()]


def expert_groups(names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """{name: its group's names in expert order} for every leaf of a group of two or more
    per-expert leaves; empty for a dense model (one expert alone is just a matrix)."""
    return {name: unit for unit in selection_units(names) if len(unit) > 1 for name in unit}


def unit_sizes(sizes: Mapping[str, int]) -> list[int]:
    """Entries per selection unit, from {name: entries of the leaf}: what floor(f x size) is
    taken of (a group's sizes summed)."""
    return [sum(int(sizes[n]) for n in unit) for unit in selection_units(sizes)]
