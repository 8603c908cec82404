"""Selection time of one Qwen3-30B-A3B MoE layer's expert scores (128 experts x gate, up, down
of 768 x 2048, random float32 on one device): grouped selection (`harmjax.masks.groups`, the
layer's experts of one kind ranked as one matrix) against per-matrix selection of the same
leaves under names that are not expert names, for `select` (q=1e-4, p=5e-4; the first run
includes compilation) and `top_candidates` (f=5e-4). Not yet run on a GPU (docs/known_gaps.md).

  PYTHONPATH=. python benchmarks/moe_select_bench.py [num_experts]
"""
import time, sys
import jax, jax.numpy as jnp, numpy as np
from harmjax.masks import select, top_candidates
from harmjax.masks.sparse import mask_indices

E, M, D = int(sys.argv[1]) if len(sys.argv) > 1 else 128, 768, 2048
key = jax.random.PRNGKey(0)
def tree(prefix):
    out = {}
    for i, (kind, shape) in enumerate([("gate_proj", (M, D)), ("up_proj", (M, D)), ("down_proj", (D, M))]):
        for e in range(E):
            out[f"model.layers.0.mlp.{prefix}.{e}.{kind}.weight"] = jax.random.normal(jax.random.fold_in(key, i * 1000 + e), shape)
    return out
from harmjax.tree import unflatten
grouped = unflatten(tree("experts"))
single = unflatten(tree("xperts"))  # not an expert name: per-matrix selection
jax.block_until_ready(grouped); jax.block_until_ready(single)
for name, t in (("per-matrix", single), ("grouped", grouped)):
    for rep in range(2):
        t0 = time.perf_counter()
        m = select(t, t, q=1e-4, p=5e-4, progress=False)
        jax.block_until_ready(m)
        print(f"{name} select q=1e-4 p=5e-4 run {rep}: {time.perf_counter() - t0:.2f} s", flush=True)
        del m
    t0 = time.perf_counter()
    c = top_candidates(t, 5e-4)
    print(f"{name} top_candidates f=5e-4: {time.perf_counter() - t0:.2f} s, {sum(len(v[0]) for v in c.values())} entries", flush=True)
print(jax.devices())
