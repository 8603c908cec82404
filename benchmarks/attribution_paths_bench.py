"""The two attribution paths side by side on one accelerator: harmjax's probe-based scan step
(`harmjax.attribution.step.jit_accumulate`, what `harmjax.score` runs) and the generic
`harmjax.attribute` (plain `jax.grad` of any apply function; here `harmjax.forward`).

Model: Llama-3.1-8B-shaped, random bfloat16 weights, one device, JAX's default memory
fraction. Data: synthetic examples of 256 tokens (64 prompt + 192 response tokens). Each
(path, kind) runs in its own process so peak-memory counters never mix. Warm throughput
excludes compilation: the step is compiled on one batch first (reported as compile_s).

  PYTHONPATH=. python benchmarks/attribution_paths_bench.py --out=benchmarks/results/attribution_paths.json
  PYTHONPATH=. python benchmarks/attribution_paths_bench.py --tiny      # CPU smoke test
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

_PATH = flags.DEFINE_enum("path", "all", ["all", "probe", "generic"], "Which path (all: each in a subprocess).")
_KIND = flags.DEFINE_enum("kind", "harm", ["harm", "retain"], "Score kind.")
_N = flags.DEFINE_integer("n", 128, "Examples.")
_BATCH = flags.DEFINE_integer("batch", 16, "Examples per micro-batch.")
_CHUNK = flags.DEFINE_integer("chunk", 1, "Per-example-gradient block (retain).")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise blocks.")
_SEQ = flags.DEFINE_integer("seq", 256, "Tokens per example.")
_TINY = flags.DEFINE_bool("tiny", False, "Tiny model (CPU smoke test).")
_OUT = flags.DEFINE_string("out", "", "Write the combined JSON here (path=all).")

# (path, kind, examples, chunk) per run of path=all. Generic retain forms per-example gradients
# of all 7 B scored weights (chunk x 14 GB in bf16 at 8B), so it runs one example at a time.
PLAN = [("probe", "harm", 412, 8), ("generic", "harm", 412, 8), ("probe", "retain", 412, 8),
        ("generic", "retain", 64, 1), ("generic", "retain", 64, 2)]


def run_one() -> dict:
    import jax
    import jax.numpy as jnp

    import harmjax
    from harmjax.attribution import DEFAULT_SCOPE, attribute
    from harmjax.attribution.core import names_for
    from harmjax.attribution.step import init_accumulators, jit_accumulate
    from harmjax.data.calibration import make_batches
    from harmjax.model.init import init_params
    from bench_common import LLAMA31_8B_SHAPE as LLAMA31_8B, TINY_SHAPE as TINY, synthetic_examples as _synthetic

    from harmjax.config import ModelConfig, RopeConfig

    shape = TINY if _TINY.value else LLAMA31_8B
    rope = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192)
    config = ModelConfig(**shape, rope=rope, rope_local=rope)
    mesh = harmjax.make_mesh(harmjax.MeshConfig(), devices=jax.devices()[:1])
    params = init_params(config, jax.random.key(0), mesh, jnp.float32 if _TINY.value else jnp.bfloat16)
    batches = make_batches(_synthetic(_N.value, _SEQ.value, shape["vocab_size"], seed=1), _BATCH.value, 0, [_SEQ.value])
    kind, remat, chunk = _KIND.value, _REMAT.value, _CHUNK.value
    names = names_for(config, None)

    if _PATH.value == "probe":
        step = jit_accumulate(config, mesh, names, kind, remat, chunk)

        def run(bs):
            accs = init_accumulators(config, mesh, names, "abs" if kind == "retain" else "signed")
            for b in bs:
                accs, _ = step(params, accs, b.input_ids, b.attention_mask, b.loss_mask)
            jax.block_until_ready(accs)
    else:
        apply_fn = lambda p, ids, m: harmjax.forward(p, config, ids, m, remat=remat)

        def run(bs):
            jax.block_until_ready(attribute(apply_fn, params, bs, kind, scope=DEFAULT_SCOPE, mesh=mesh,
                                            chunk=chunk, progress=False))

    start = time.perf_counter()
    run(batches[:1])
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    run(batches)
    seconds = time.perf_counter() - start
    tokens = sum(b.num_tokens for b in batches)
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0)
    return {
        "path": _PATH.value, "kind": kind, "examples": _N.value, "batch": _BATCH.value, "chunk": chunk,
        "remat": remat, "tokens": tokens, "compile_s": round(compile_s, 2), "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1), "peak_gib": round(peak / 2**30, 2),
        "device": jax.devices()[0].device_kind,
        "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "default (0.75)"),
    }


def main(argv):
    del argv
    if _PATH.value != "all":
        print("RESULT " + json.dumps(run_one()), flush=True)
        return
    results = []
    here = os.path.dirname(os.path.abspath(__file__))
    for path, kind, n, chunk in PLAN:
        n_run = min(n, 32) if _TINY.value else n
        cmd = [sys.executable, os.path.join(here, "attribution_paths_bench.py"), f"--path={path}", f"--kind={kind}",
               f"--n={n_run}", f"--batch={_BATCH.value}", f"--chunk={chunk}", f"--remat={_REMAT.value}",
               f"--seq={_SEQ.value}", f"--tiny={_TINY.value}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        result = json.loads(line[-1][7:]) if line else {
            "path": path, "kind": kind, "chunk": chunk, "error": proc.stderr.strip().splitlines()[-3:]}
        print(json.dumps(result), flush=True)
        results.append(result)
    if _OUT.value:
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
