"""The fused per-example |grad| kernel (`harmjax.attribution.abs_kernel`) against XLA's
per-example blocks (the probes' chunked einsum + |.| + sum) on one device, at the per-device
shapes of a retain scan: warm time, TFLOP/s (2 x batch x seq x out x in per call) and the
largest relative difference, per tiling of the kernel.

  PYTHONPATH=. python benchmarks/abs_kernel_check.py                      # Qwen2.5-32B, FSDP 2
  PYTHONPATH=. python benchmarks/abs_kernel_check.py --batch=16 --tilings=128,128,32,8,3
"""

from __future__ import annotations

import json
import time

from absl import app, flags

_BATCH = flags.DEFINE_integer("batch", 8, "Examples per device (batch 16 over FSDP 2).")
_SEQ = flags.DEFINE_integer("seq", 256, "Tokens per example.")
_SHAPES = flags.DEFINE_list("shapes", ["27648x5120", "5120x27648", "5120x5120", "1024x5120"], "out x in.")
_CHUNK = flags.DEFINE_integer("chunk", 8, "Per-example block of the XLA path.")
_TILINGS = flags.DEFINE_multi_string(
    "tilings", ["128,128,32,8,3", "128,64,32,4,3", "64,128,64,4,3", "128,128,64,8,2", "64,64,32,4,4"],
    "block_o,block_i,block_t,num_warps,num_stages")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (median).")


def _time(fn, *args):
    import numpy as np

    fn(*args).block_until_ready()
    times = []
    for _ in range(_REPEATS.value):
        t = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from harmjax.attribution import abs_kernel

    def xla(x, g):
        total = None
        for s in range(0, x.shape[0], _CHUNK.value):
            blk = jnp.einsum("bto,bti->boi", g[s:s + _CHUNK.value], x[s:s + _CHUNK.value],
                             preferred_element_type=jnp.float32)
            part = jnp.abs(blk).sum(0)
            total = part if total is None else total + part
        return total

    for shape in _SHAPES.value:
        o, i = (int(v) for v in shape.split("x"))
        kx, kg = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (_BATCH.value, _SEQ.value, i), jnp.bfloat16)
        g = jax.random.normal(kg, (_BATCH.value, _SEQ.value, o), jnp.bfloat16)
        flops = 2 * _BATCH.value * _SEQ.value * o * i
        f_xla = jax.jit(xla)
        ref = f_xla(x, g)
        t = _time(f_xla, x, g)
        print(json.dumps({"shape": shape, "path": "xla", "ms": round(t * 1e3, 3), "tflops": round(flops / t / 1e12, 1),
                          "device": jax.devices()[0].device_kind}), flush=True)
        ref_np = np.asarray(ref)
        for tiling in _TILINGS.value:
            cfg = abs_kernel.AbsKernelConfig(*(int(v) for v in tiling.split(",")))
            row = {"shape": shape, "path": "kernel", "tiling": tiling}
            try:
                f = jax.jit(lambda a, b, cfg=cfg: abs_kernel.local_abs_grad_sum(a, b, cfg))
                out = np.asarray(f(x, g))
                t = _time(f, x, g)
                row.update(ms=round(t * 1e3, 3), tflops=round(flops / t / 1e12, 1),
                           max_rel_diff=float(np.abs(out - ref_np).max() / np.abs(ref_np).max()))
            except Exception as e:  # a tiling Triton cannot compile: report it, try the next
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row), flush=True)
        del x, g, ref


if __name__ == "__main__":
    app.run(main)
