"""Where the fused |grad| kernel and XLA's path part ways on a GPU mesh (issue 15).

In the whole 14B retain scan on 2 x H200 the kernel's accumulators differed from the XLA
path's by up to 8.9% of the largest entry, while XLA against XLA (two compilations) was
bitwise equal and the kernel alone matched XLA to 1.5e-7. This runs the same operands
through each layer of the integration, every result against a float64 NumPy reference on a
slice of output rows:

  local     `local_abs_grad_sum` on one device, per half of the batch, summed on the host
  mesh      `abs_grad_sum` (shard_map + reduce-scatter into the accumulator's sharding)
  xla       the probes' chunked einsum + |.| + sum, jitted with the same out sharding
  probe_*   the accumulator cotangent of `probed_linear` under jit(grad), kernel on / off
  shared    three probed linears sharing x in one jit(grad), accumulators split on
            different dimensions (a layer's q/k/v), kernel on / off

  PYTHONPATH=. python benchmarks/abs_kernel_mesh_check.py    # needs >= 2 GPUs
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np

from absl import app, flags

_SHAPES = flags.DEFINE_list("shapes", ["5120x5120", "5120x13824", "13824x5120", "1024x5120"], "out x in.")
_BATCH = flags.DEFINE_integer("batch", 16, "Examples (global; split over FSDP).")
_SEQ = flags.DEFINE_integer("seq", 256, "Tokens per example.")
_ROWS = flags.DEFINE_integer("rows", 64, "Output rows checked against float64, at each end.")
_OUT = flags.DEFINE_string("out", "", "Also write the rows here (JSON lines).")


def probe_grads(x, gs, ws, shardings, setting: str):
    """The accumulator cotangents of `probed_linear`s sharing `x` in one jit(grad) with donated
    accumulators (one per weight, in `shardings`), with HARMJAX_ABS_KERNEL=`setting`."""
    import jax
    import jax.numpy as jnp

    from harmjax.attribution.probes import probed_linear

    os.environ["HARMJAX_ABS_KERNEL"] = setting

    def step(a, bs, accs):
        def loss(accs):
            return sum(jnp.sum(probed_linear(a, w, acc, "abs", 8, sh).astype(jnp.float32) * b.astype(jnp.float32))
                       for w, acc, sh, b in zip(ws, accs, shardings, bs))
        return jax.grad(loss)(accs)

    accs = [jax.device_put(jnp.zeros(w.shape, jnp.float32), sh) for w, sh in zip(ws, shardings)]
    # A fresh jit per call: the setting is read at trace time, and jit caches traces by function.
    return [np.asarray(r) for r in jax.jit(step, donate_argnums=2)(x, gs, accs)]


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from harmjax.attribution import abs_kernel
    from harmjax.attribution.probes import per_example_sums
    from harmjax.sharding import MeshConfig, make_mesh

    on = "1" if jax.default_backend() == "gpu" else "interpret"  # CPU: a smoke run in Pallas' interpreter
    mesh = make_mesh(MeshConfig(1, -1, 1))
    batch_sh = NamedSharding(mesh, P("fsdp", None, None))
    rows = []
    for shape in _SHAPES.value:
        o, i = (int(v) for v in shape.split("x"))
        kx, kg, kw, ks = jax.random.split(jax.random.key(zlib.crc32(shape.encode())), 4)
        x = jax.device_put(jax.random.normal(kx, (_BATCH.value, _SEQ.value, i), jnp.bfloat16), batch_sh)
        g = jax.device_put(jax.random.normal(kg, (_BATCH.value, _SEQ.value, o), jnp.bfloat16), batch_sh)
        w = jax.random.normal(kw, (o, i), jnp.bfloat16) * 0.02
        xh = np.asarray(x, np.float64)
        sl = np.r_[0:_ROWS.value, o - _ROWS.value:o]

        def reference(gj):  # float64, the checked rows only
            return np.abs(np.einsum("bto,bti->boi", np.asarray(gj, np.float64)[..., sl], xh)).sum(0)

        ref = reference(g)
        for spec in (P("fsdp", None), P(None, "fsdp")):
            acc_sh = NamedSharding(mesh, spec)
            os.environ["HARMJAX_ABS_KERNEL"] = on
            assert abs_kernel.applicable(x, g, acc_sh), (shape, spec)
            results = {}
            half = _BATCH.value // 2
            dev0 = jax.devices()[0]
            results["local"] = sum(np.asarray(abs_kernel.local_abs_grad_sum(
                jax.device_put(x[s], dev0), jax.device_put(g[s], dev0), interpret=on == "interpret"))
                for s in (slice(0, half), slice(half, None)))
            results["mesh"] = np.asarray(jax.jit(lambda a, b: abs_kernel.abs_grad_sum(a, b, acc_sh))(x, g))
            results["xla"] = np.asarray(jax.jit(lambda a, b: per_example_sums(a, b, 8)[0], out_shardings=acc_sh)(x, g))

            for setting in (on, "0"):
                results[f"probe_{'xla' if setting == '0' else 'kernel'}"] = probe_grads(x, [g], [w], [acc_sh], setting)[0]
            scale = float(np.abs(ref).max())
            row = {"shape": shape, "acc_spec": str(spec), "batch": _BATCH.value, "seq": _SEQ.value,
                   "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
                   "max_rel_diff_vs_float64": {k: float(np.abs(v[sl] - ref).max() / scale) for k, v in results.items()},
                   "max_rel_diff_mesh_vs_xla": float(np.abs(results["mesh"] - results["xla"]).max()
                                                     / np.abs(results["xla"]).max())}
            print(json.dumps(row), flush=True)
            rows.append(row)

        # As in a decoder layer: three probed linears share x (q, k, v; gate, up) in one program,
        # their accumulators split on different dimensions, so one step holds several kernel
        # calls and reduce-scatters of different scatter dimensions that XLA may combine.
        specs = (P("fsdp", None), P(None, "fsdp"), P("fsdp", None))
        shs = [NamedSharding(mesh, sp) for sp in specs]
        gs = [g] + [jax.device_put(jax.random.normal(k, g.shape, jnp.bfloat16), batch_sh)
                    for k in jax.random.split(ks, 2)]
        refs = [ref] + [reference(gj) for gj in gs[1:]]
        out = {"xla" if setting == "0" else "kernel": probe_grads(x, gs, [w, w * 2, w * 3], shs, setting)
               for setting in (on, "0")}
        row = {"shape": shape, "program": "three probed linears sharing x", "acc_specs": [str(sp) for sp in specs],
               "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
               "max_rel_diff_vs_float64": {k: [float(np.abs(v[j][sl] - refs[j]).max() / np.abs(refs[j]).max())
                                               for j in range(3)] for k, v in out.items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if _OUT.value:
        with open(_OUT.value, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    app.run(main)
