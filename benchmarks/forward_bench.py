"""Accelerator check and forward-pass throughput of the decoder.

1. Parity on the accelerator: for every supported family, a tiny random transformers model
   (PyTorch, CPU, float32, eager attention) against harmjax's forward on the default JAX
   device; prints max |diff| / std of the logits and argmax agreement.
2. Throughput: a Llama-3.1-8B-shaped model with random bfloat16 weights created directly on
   the device; jitted forward over batch x seq tokens; tokens/s, model FLOP utilisation
   (2 x params x tokens / time, against a bf16 matmul rate measured in the same process),
   peak device memory.

  PYTHONPATH=. python benchmarks/forward_bench.py --batch=8 --seq=256
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from bench_common import matmul_tflops

_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per forward pass.")
_SEQ = flags.DEFINE_integer("seq", 256, "Tokens per sequence.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed forward passes.")
_PARITY = flags.DEFINE_bool("parity", True, "Run the tiny-model parity check first.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
_MESH = flags.DEFINE_list("mesh", ["-1", "1", "1"], "Mesh sizes data,fsdp,tensor (-1 = the rest).")

LLAMA31_8B = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
    max_position_embeddings=131072,
)


def parity() -> dict:
    """Tiny-model logits parity against transformers for each family, on the default device."""
    import tempfile

    import harmjax
    from tests.hf_reference import FAMILIES, left_padded_batch, save_tiny, tiny_hf_model, torch_logits

    results = {}
    with jax.default_matmul_precision("highest"):
        for family in sorted(FAMILIES):
            hf_model = tiny_hf_model(family)
            with tempfile.TemporaryDirectory() as d:
                model = harmjax.load(save_tiny(hf_model, d), dtype="float32")
            ids, mask, pos = left_padded_batch()
            ref = torch_logits(hf_model, ids, mask, pos)
            ours = np.asarray(harmjax.forward(model.params, model.config, jnp.asarray(ids), jnp.asarray(mask)))
            valid = mask.astype(bool)
            results[family] = {
                "max_diff_over_std": float(np.abs(ours - ref)[valid].max() / ref[valid].std()),
                "argmax_agreement": float((ours.argmax(-1) == ref.argmax(-1))[valid].mean()),
            }
            print(f"parity {family:8s} {results[family]}", flush=True)
    return results


def throughput(batch: int, seq: int, repeats: int) -> dict:
    """Forward throughput of the 8B-shaped model."""
    import harmjax
    from harmjax.config import ModelConfig, RopeConfig
    from harmjax.model.init import init_params

    rope = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192)
    config = ModelConfig(**LLAMA31_8B, rope=rope, rope_local=rope)
    mesh = harmjax.make_mesh(harmjax.MeshConfig(*(int(x) for x in _MESH.value)))
    params = init_params(config, jax.random.key(0), mesh, jnp.bfloat16)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    fn = harmjax.jit_forward(config, mesh)
    ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, config.vocab_size, jnp.int32)
    mask = jnp.ones((batch, seq), jnp.int32)
    start = time.perf_counter()
    fn(params, ids, mask).block_until_ready()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(params, ids, mask).block_until_ready()
        times.append(time.perf_counter() - start)
    step = float(np.median(times))
    tokens = batch * seq
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())
    rate = matmul_tflops()
    return {
        "params": n_params, "batch": batch, "seq": seq, "mesh": dict(mesh.shape), "compile_s": compile_s,
        "forward_s": step, "tokens_per_s": tokens / step,
        "model_tflops": 2 * n_params * tokens / step / 1e12,
        "matmul_tflops_measured": rate,
        "mfu": 2 * n_params * tokens / step / 1e12 / (rate * jax.device_count()),
        "peak_gib_per_device": peak / 2**30,
    }


def main(argv):
    del argv
    device = jax.devices()[0]
    results = {"device": f"{device.platform}:{device.device_kind}", "jax": jax.__version__}
    print(results, flush=True)
    if _PARITY.value:
        results["parity"] = parity()
    results["throughput"] = throughput(_BATCH.value, _SEQ.value, _REPEATS.value)
    print(json.dumps(results["throughput"], indent=2), flush=True)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
