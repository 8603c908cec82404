"""Selection's global engines (granularity "global"): one top floor(q*N) over all N scored
weights, ties broken by the lowest flat index with leaves in HF parameter order.

The threshold key is planned on the host: its digits are chosen one pass at a time from
exact int64 counts summed over every leaf (the total may exceed 2**31), then every layer's
masks are built in one program from the plan; a leaf whose entries equal to the threshold
are only partly taken is cut by bisection (`_cut_leaf`). Two planners:
  - accelerators (`_plan`): 4 bits per pass, one counting program per decoder layer, so the
    search compiles two small programs per model;
  - CPU (`_global_plan_one_program`): 1 bit per pass with one program over every leaf,
    since XLA:CPU must finish each multi-device program before the next.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from harmjax.distributed import to_host
from harmjax.masks.algebra import hf_order_key
from harmjax.masks.select_compile import jit_to, on_cpu, precompile, replicated_like, sharding_of, signature, \
    wait_if_collective
from harmjax.masks.select_keys import as_2d, count, count_ge, first_equal_matrix, sort_keys, top_count


def _radix_bits(leaf: Any) -> int:
    """Bits of the global threshold found per host-driven pass (a divisor of 32): 4 on
    accelerators (`_plan`, one program per layer); 1 on CPUs, which run one program over
    every leaf instead (`_global_plan_one_program`): XLA:CPU must finish each
    multi-device program before the next, so many small programs cost more there than one
    big compilation (measured: docs/measurements.md "Selection")."""
    return 1 if on_cpu(leaf) else 4


def _layer_chunks(names: list[str]) -> list[list[int]]:
    """Positions of the leaves of each decoder layer (leaves outside layers alone). Every
    layer's chunk has the same shapes and shardings, so a program over a chunk compiles once
    per model and a pass dispatches one program per layer rather than one per leaf,
    while one program over every leaf is slow to compile on accelerators."""
    chunks: list[list[int]] = []
    last = None
    for i, name in enumerate(names):
        key = hf_order_key(name)
        layer = key[1] if key[0] == 1 else None
        if layer is not None and layer == last:
            chunks[-1].append(i)
        else:
            chunks.append([i])
        last = layer
    return chunks


@functools.lru_cache(maxsize=None)
def _chunk_counter(out_sharding):
    """counts[i, j] = #(keys of leaf i >= cands[i, j]) over a chunk's leaves (0 where not
    valid[i, j]): one pass over each leaf for all its candidates."""

    def counts(xs, cands, valid, flip):
        got = jnp.stack([count_ge(sort_keys(x, flip), cands[i], None) for i, x in enumerate(xs)])
        return jnp.where(valid, got, 0)

    return jit_to(counts, out_sharding)


def _count_all(leaves: list[Any], chunks: list[list[int]], cands: np.ndarray, valid: np.ndarray,
               flip: bool) -> np.ndarray:
    """(leaves, W) int64 counts of keys >= cands[i, j], one program per chunk; every chunk's
    program is dispatched before one transfer to the host (fetching each program's counts
    apart costs a synchronisation per program)."""
    counter = _chunk_counter(replicated_like(leaves[0]))
    # XLA:CPU must finish each multi-device program before the next (see `wait_if_collective`).
    cpu = on_cpu(leaves[0])
    parts = []
    for chunk in chunks:
        parts.append(counter(tuple(leaves[i] for i in chunk), cands[chunk].astype(np.uint32), valid[chunk],
                             np.bool_(flip)))
        if cpu:
            wait_if_collective(parts[-1])
    return to_host(jnp.concatenate(parts)).astype(np.int64)


def _plan(leaves: list[Any], chunks: list[list[int]], k: int, flip: bool,
          bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per leaf: the global threshold key t (the k-th largest key over every leaf), how many
    entries equal to t the leaf contributes, and how many it holds.

    t is found `bits` bits at a time from the most significant: the largest digit d with
    count(keys >= t + d << shift) >= k (true for d = 0), every candidate digit counted in
    one pass, with one program per layer (`_count_all`). Counts are summed as exact int64
    (the total may exceed 2**31). Entries equal to t join in leaf order (the lowest flat
    index wins ties)."""
    if 32 % bits:
        raise ValueError(f"bits per pass must divide 32, got {bits}.")
    n, width = len(leaves), _plan_width(bits)
    digits = np.arange(1, 1 << bits, dtype=np.uint64)
    valid = np.zeros((n, width), bool)
    valid[:, : digits.size] = True
    t = 0
    for shift in range(32 - bits, -1, -bits):
        cands = np.zeros((n, width), np.uint64)
        cands[:, : digits.size] = t + (digits << np.uint64(shift))
        totals = _count_all(leaves, chunks, cands, valid, flip).sum(0)[: digits.size]
        # counts fall as the candidate grows, so the digits that still reach k are a prefix
        t += int((totals >= k).sum()) << shift
    cands = np.zeros((n, width), np.uint64)
    cands[:, 0], cands[:, 1] = t, min(t + 1, 0xFFFFFFFF)
    valid = np.zeros((n, width), bool)
    valid[:, 0], valid[:, 1] = True, t < 0xFFFFFFFF  # t + 1 = 2**32: nothing is above t
    counts = _count_all(leaves, chunks, cands, valid, flip)
    gt, eq = counts[:, 1], counts[:, 0] - counts[:, 1]
    take = np.asarray(_ties_to_take(k, [int(x) for x in gt], [int(x) for x in eq]), np.int64)
    return np.full(n, t, np.uint32), take, eq


def _plan_width(bits: int) -> int:
    # Candidates counted per pass: every nonzero digit, and at least 2 (t and t + 1 at the end).
    return max(2, (1 << bits) - 1)


def _ties_to_take(k: int, gt: list[int], eq: list[int]) -> list[int]:
    """Per leaf, how many entries equal to the threshold join the k selected: the k - sum(gt)
    still missing, taken from the leaves in order (the lowest flat index wins ties)."""
    remaining = k - sum(gt)
    take = []
    for n_eq in eq:
        take.append(min(max(remaining, 0), n_eq))
        remaining -= take[-1]
    return take


@functools.lru_cache(maxsize=None)
def _global_counter(out_sharding, strict: bool):
    """Per-leaf counts of keys >= t (or > t and == t when strict) for a list of leaves."""

    def counts(leaves, t, flip):
        keys = [sort_keys(x, flip) for x in leaves]
        if strict:
            return (jnp.stack([count(k > t, None) for k in keys]),
                    jnp.stack([count(k == t, None) for k in keys]))
        return jnp.stack([count(k >= t, None) for k in keys])

    return jit_to(counts, out_sharding)


def _host_ints(x) -> list[int]:
    return [int(v) for v in to_host(x).astype(np.int64)]


def _global_plan_one_program(leaves: list[Any], k: int, flip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_plan` of one global unit with one bit per pass and one program over every leaf (the
    CPU path)."""
    out = replicated_like(leaves[0])
    ge = _global_counter(out, False)
    t = 0
    if k > 0:
        for bit in range(31, -1, -1):
            cand = t | (1 << bit)
            if sum(_host_ints(ge(leaves, np.uint32(cand), np.bool_(flip)))) >= k:
                t = cand
    else:
        t = 0xFFFFFFFF  # no key equals it: nothing selected
    gt, eq = _global_counter(out, True)(leaves, np.uint32(t), np.bool_(flip))
    eq = np.asarray(_host_ints(eq), np.int64)
    take = np.asarray(_ties_to_take(k, _host_ints(gt), [int(x) for x in eq]), np.int64)
    return np.full(len(leaves), t, np.uint32), take, eq


def _planned_part(x, t, all_equal, flip):
    # A leaf's part when its ties need no cut: above t, plus every entry equal to t or none.
    keys = sort_keys(x, flip)
    return (keys > t) | ((keys == t) & all_equal)


@functools.lru_cache(maxsize=None)
def _chunk_masker(out_shardings: tuple):
    """A chunk's masks from its plans ({part: (t, all ties taken) per leaf}): T_q, the skip
    control and T_p combined elementwise, one program per chunk signature."""

    def masks(hs, rs, plans, flip):
        out = []
        for i, h in enumerate(hs):
            selected = _planned_part(h, plans["q"][0][i], plans["q"][1][i], flip)
            if "q_skip" in plans:
                selected = _planned_part(h, plans["q_skip"][0][i], plans["q_skip"][1][i], flip) & ~selected
            if rs is not None:
                selected = selected & ~_planned_part(rs[i], plans["p"][0][i], plans["p"][1][i], False)
            out.append(selected)
        return tuple(out)

    return jax.jit(masks) if None in out_shardings else jax.jit(masks, out_shardings=out_shardings)


def _cut_leaf(harm, retain, plans, flip):
    """A leaf's mask when some part takes only the first few of its entries equal to t: those
    are cut by bisection in row-major order (`first_equal_matrix`)."""
    shape = harm.shape

    def part(x, plan, leaf_flip):
        t, r = plan
        keys = sort_keys(as_2d(x), leaf_flip)
        return (keys > t) | first_equal_matrix(keys == t, r)

    selected = part(harm, plans["q"], flip)
    if "q_skip" in plans:
        selected = part(harm, plans["q_skip"], flip) & ~selected
    if retain is not None:
        selected = selected & ~part(retain, plans["p"], False)
    return selected.reshape(shape)


@functools.lru_cache(maxsize=None)
def _cut_leaf_selector(sharding):
    return jit_to(_cut_leaf, sharding)


def _global_jobs(leaves, retains, chunks, bits: int, parts: list[str]) -> dict:
    """`precompile` jobs of global selection: per distinct layer signature, the counter (for
    harm and retain leaves) and the mask program."""
    jobs = {}
    for chunk in chunks:
        hs = tuple(leaves[i] for i in chunk)
        rs = tuple(retains[i] for i in chunk) if retains is not None else None
        if bits > 1:
            width = _plan_width(bits)
            zeros = (np.zeros((len(chunk), width), np.uint32), np.zeros((len(chunk), width), bool), np.bool_(False))
            for xs in [hs] + ([rs] if rs is not None else []):
                counter = _chunk_counter(replicated_like(leaves[0]))
                jobs.setdefault(("count",) + signature(*xs), (counter, (xs,) + zeros))
        dummy = {key: (np.zeros(len(chunk), np.uint32), np.zeros(len(chunk), bool)) for key in parts}
        jobs.setdefault(("mask",) + signature(*hs) + signature(*(rs or ())),
                        (_chunk_masker(tuple(sharding_of(h) for h in hs)), (hs, rs, dummy, np.bool_(False))))
    return jobs


def select_global(harm_items, retain_flat, q, p, flip, skip, progress,
                  compile_first: bool = True) -> Iterator[tuple[str, Any]]:
    """Global selection of checked arguments (`harmjax.masks.select.check_arguments`): yields
    (HF name, bool mask) in the order of `harm_items` (HF order), which is also the tie order
    across leaves. The thresholds are planned on the host (`_plan`, or on CPU
    `_global_plan_one_program`), then every layer's masks come from one program. An expert
    group (`harmjax.masks.groups`) is selected as such a unit; `compile_first=False` skips the
    side-by-side compilation for a group whose programs an earlier group compiled."""
    names = [n for n, _ in harm_items]
    leaves = [leaf for _, leaf in harm_items]
    chunks = _layer_chunks(names)
    bits = _radix_bits(leaves[0])
    total = sum(int(x.size) for x in leaves)

    def plan(tree_leaves, fraction, leaf_flip, double=False):
        k = min(2 * top_count(fraction, total), total) if double else top_count(fraction, total)
        if bits == 1:  # CPU: one program over every leaf
            return _global_plan_one_program(tree_leaves, k, leaf_flip)
        return _plan(tree_leaves, chunks, k, leaf_flip, bits)

    retains = [retain_flat[n] for n in names] if retain_flat is not None else None
    if compile_first:
        precompile(_global_jobs(leaves, retains, chunks, bits,
                                ["q"] + ["q_skip"] * skip + ["p"] * (retains is not None)))
    plans = {"q": plan(leaves, q, flip)}
    if skip:
        plans["q_skip"] = plan(leaves, q, flip, double=True)
    if retains is not None:
        plans["p"] = plan(retains, p, False)
    cut = np.zeros(len(leaves), bool)
    for _, take, eq in plans.values():
        cut |= (take > 0) & (take < eq)
    bar = tqdm(total=len(names), desc="select (global)", unit="matrix", disable=not progress, leave=False)
    for chunk in chunks:
        hs = tuple(leaves[i] for i in chunk)
        rs = tuple(retains[i] for i in chunk) if retains is not None else None
        chunk_plans = {key: (t[chunk], take[chunk] == eq[chunk]) for key, (t, take, eq) in plans.items()}
        masks = _chunk_masker(tuple(sharding_of(h) for h in hs))(hs, rs, chunk_plans, np.bool_(flip))
        for j, i in enumerate(chunk):
            mask = masks[j]
            if cut[i]:
                leaf_plans = {key: (t[i], np.int32(take[i])) for key, (t, take, _) in plans.items()}
                mask = _cut_leaf_selector(sharding_of(hs[j]))(hs[j], rs[j] if rs is not None else None,
                                                                leaf_plans, np.bool_(flip))
            bar.update()
            yield names[i], wait_if_collective(mask)
        del masks
    bar.close()
