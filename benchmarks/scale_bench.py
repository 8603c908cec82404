"""Attribution scans at the paper's model sizes on the local GPUs: harmjax's scan step
(`harmjax.attribution.step.jit_accumulate`, what `harmjax.score` and the experiment run),
random bf16 weights made on the devices (never on the host), synthetic 256-token examples.

For each repeat it runs every kind in --kinds one after the other in this one process (a
retain scan after a harm scan once died in an XLA collective rendezvous at 32B on 2 GPUs), and
prints one JSON row per scan: compile time, warm wall time, tokens/s, MFU (6 x params x tokens
/ time over the measured bf16 matmul rate x devices), peak memory per device, and the
device-memory preflight's estimate (`harmjax.memory`). The memory fraction is harmjax's
launcher default (0.9) unless XLA_PYTHON_CLIENT_MEM_FRACTION is set.

  PYTHONPATH=. python benchmarks/scale_bench.py --shape=qwen25_32b --mesh=1,-1,1 --remat
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.53 PYTHONPATH=. python benchmarks/scale_bench.py --shape=llama31_8b --remat
  PYTHONPATH=. python benchmarks/scale_bench.py --shape=tiny     # CPU smoke test
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

_SHAPE = flags.DEFINE_enum("shape", "qwen25_32b", ["tiny", "llama31_8b", "qwen25_14b", "qwen25_32b"], "Model shape.")
_MESH = flags.DEFINE_list("mesh", ["1", "-1", "1"], "Mesh data,fsdp,tensor (-1 = the rest).")
_KINDS = flags.DEFINE_list("kinds", ["harm", "retain"], "Scan kinds, run in this order in one process.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Times to run the kinds in sequence.")
_N = flags.DEFINE_integer("n", 412, "Examples per scan.")
_BATCH = flags.DEFINE_integer("batch", 16, "Examples per micro-batch.")
_SEQ = flags.DEFINE_integer("seq", 256, "Tokens per example.")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise blocks.")
_ABS_CHUNK = flags.DEFINE_integer("abs_chunk", 8, "Per-example block of the retain scan.")
_OUT = flags.DEFINE_string("out", "", "Also write the rows here (JSON lines).")

QWEN25 = dict(model_type="qwen2", vocab_size=152064, num_heads=40, num_kv_heads=8, head_dim=128,
              rms_norm_eps=1e-6, max_position_embeddings=32768, qkv_bias=True)
SHAPES = {
    "tiny": dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024, qkv_bias=True),
    "llama31_8b": None,  # bench_common.LLAMA31_8B_SHAPE
    "qwen25_14b": dict(QWEN25, hidden_size=5120, intermediate_size=13824, num_layers=48),
    "qwen25_32b": dict(QWEN25, hidden_size=5120, intermediate_size=27648, num_layers=64),
}


def main(argv):
    del argv
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # launch.common's default
    import jax
    import jax.numpy as jnp

    import harmjax
    from bench_common import LLAMA31_8B_SHAPE, matmul_tflops, synthetic_examples
    from harmjax.attribution.step import abstract_accumulators, accumulator_mode, init_accumulators, jit_accumulate, names_for
    from harmjax.config import ModelConfig, RopeConfig
    from harmjax.data.calibration import make_batches
    from harmjax.memory import program_bytes
    from harmjax.model.init import init_params
    from harmjax.sharding import batch_sharding

    shape = SHAPES[_SHAPE.value] or LLAMA31_8B_SHAPE
    rope = RopeConfig(theta=1e6)
    config = ModelConfig(**shape, rope=rope, rope_local=rope)
    mesh = harmjax.make_mesh(harmjax.MeshConfig(*(int(x) for x in _MESH.value)))
    tiny = _SHAPE.value == "tiny"
    t = time.perf_counter()
    params = init_params(config, jax.random.key(0), mesh, jnp.float32 if tiny else jnp.bfloat16)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t
    n_params = sum(x.size for x in jax.tree.leaves(params))
    rate = matmul_tflops(1024 if tiny else 8192)
    names = names_for(config, None)
    batches = make_batches(synthetic_examples(_N.value, _SEQ.value, shape["vocab_size"], seed=1), _BATCH.value, 0,
                           [_SEQ.value])
    sharding = batch_sharding(mesh)
    tokens = sum(b.num_tokens for b in batches)

    def place(b):
        return [jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i])
                for a in (b.input_ids, b.attention_mask, b.loss_mask)]

    rows = []
    for repeat in range(_REPEATS.value):
        for kind in _KINDS.value:
            mode = accumulator_mode(kind)
            step = jit_accumulate(config, mesh, names, kind, _REMAT.value, _ABS_CHUNK.value)
            t = time.perf_counter()
            specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
                     for a in (batches[0].input_ids, batches[0].attention_mask, batches[0].loss_mask)]
            estimate = program_bytes(step.lower(params, abstract_accumulators(config, mesh, names, mode), *specs).compile())
            accs = init_accumulators(config, mesh, names, mode)
            accs, loss = step(params, accs, *place(batches[0]))
            loss.block_until_ready()
            compile_s = time.perf_counter() - t
            del accs, loss
            accs = init_accumulators(config, mesh, names, mode)
            jax.block_until_ready(accs)
            t = time.perf_counter()
            for b in batches:
                accs, loss = step(params, accs, *place(b))
            jax.block_until_ready(accs)
            seconds = time.perf_counter() - t
            finite = bool(all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(accs)))
            del accs, loss
            peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())
            row = {
                "shape": _SHAPE.value, "mesh": dict(mesh.shape), "kind": kind, "repeat": repeat, "remat": _REMAT.value,
                "batch": _BATCH.value, "examples": _N.value, "tokens": tokens, "params": n_params,
                "init_s": round(init_s, 1), "compile_s": round(compile_s, 1), "seconds": round(seconds, 2),
                "tokens_per_s": round(tokens / seconds), "mfu": round(6 * n_params * tokens / seconds / 1e12
                                                                     / (rate * mesh.devices.size), 3),
                "peak_gib_per_device": round(peak / 2**30, 2), "preflight_estimate_gib": round(estimate / 2**30, 2),
                "accumulators_finite": finite, "device": jax.devices()[0].device_kind,
                "mem_fraction": os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"], "matmul_tflops": round(rate, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    app.run(main)
