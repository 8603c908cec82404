"""GPU check of the flash-decoding kernel (harmjax/model/decode_attention.py) against XLA's
decode attention: outputs and time at Llama-3.1-8B batch-64 shapes, then greedy decoding of a
small random bf16 model with the kernel on and off.

Greedy tokens of a random bf16 model diverge after any near-tie, so token agreement alone
says little. The check that matters is teacher-forced: every token the cached decode loop
chose is re-scored by a full uncached forward pass (XLA attention, no kernel); its logit
margin below that pass's best logit is reported for both settings, and a correct kernel has
margins of the same bf16-noise size as the XLA decode loop.

  PYTHONPATH=. python benchmarks/decode_kernel_check.py
  PYTHONPATH=. python benchmarks/decode_kernel_check.py --mesh=1,1,2   # data,fsdp,tensor over GPUs:
      the generation part only, the kernel per shard under shard_map
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def _time(f, *args, repeats=20):
    f(*args).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(*args)
    out.block_until_ready()
    return (time.perf_counter() - start) / repeats


def main(mesh_shape=None):
    from harmjax.model import decode_attention, layers
    from harmjax.model.decode_attention import pallas_decode_attention

    result = {"device": jax.devices()[0].device_kind, "devices": jax.device_count()}
    rng = np.random.default_rng(0)
    if mesh_shape is None:
        result.update(_attention_alone(layers, pallas_decode_attention, rng))
    result.update(_generation(decode_attention, rng, mesh_shape))
    print(json.dumps(result), flush=True)


def _attention_alone(layers, pallas_decode_attention, rng):
    b, kv, g, d, slots = 64, 8, 4, 128, 384
    q = jnp.asarray(rng.standard_normal((b, 1, kv * g, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, kv, slots, d)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, kv, slots, d)), jnp.bfloat16)
    valid = np.zeros((b, slots), bool)
    for i, pad in enumerate(rng.integers(0, 100, b)):
        valid[i, pad:256] = True  # left-padded 128-token prompt + 128 generated tokens
    mask = jnp.asarray(valid[:, None, :])
    xla = jax.jit(lambda q, k, v: layers.attention(q, k, v, mask, d**-0.5, kv_heads_first=True))
    ker = jax.jit(lambda q, k, v: pallas_decode_attention(q, k, v, mask, d**-0.5))
    diff = float(jnp.abs(xla(q, k, v).astype(jnp.float32) - ker(q, k, v).astype(jnp.float32)).max())
    return {"max_abs_diff_bf16": diff, "xla_ms_per_layer": _time(xla, q, k, v) * 1e3,
            "kernel_ms_per_layer": _time(ker, q, k, v) * 1e3}


def _generation(decode_attention, rng, mesh_shape):
    import harmjax
    from harmjax.config import ModelConfig
    from harmjax.generate import sampler
    from harmjax.model.init import init_params

    config = ModelConfig(model_type="llama", vocab_size=1024, hidden_size=512, intermediate_size=1024,
                         num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5,
                         max_position_embeddings=2048)
    data, fsdp, tensor = mesh_shape or (1, 1, 1)
    mesh = harmjax.make_mesh(harmjax.MeshConfig(data=data, fsdp=fsdp, tensor=tensor),
                             jax.devices()[: data * fsdp * tensor])
    calls = []
    kernel = decode_attention.pallas_decode_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    decode_attention.pallas_decode_attention = counted
    params = init_params(config, jax.random.key(0), mesh, jnp.bfloat16, std=0.05)
    prompts = [list(rng.integers(3, 1024, n)) for n in (5, 40, 77, 128)]
    outs = {}
    for flag in ("1", "0"):
        os.environ["HARMJAX_DECODE_KERNEL"] = flag
        sampler.jit_prefill.cache_clear()
        sampler.jit_decode.cache_clear()
        outs[flag] = sampler.generate_ids(params, config, mesh, prompts, max_new_tokens=64, batch_size=4,
                                          eos_ids=(), progress=False).tokens
    result = {"mesh": [data, fsdp, tensor], "kernel_traced": len(calls)}
    pairs = [(a, c) for x, y in zip(outs["1"], outs["0"]) for a, c in zip(x, y)]
    result["greedy_token_agreement"] = float(np.mean([a == c for a, c in pairs]))
    from harmjax.model.decoder import forward

    os.environ["HARMJAX_DECODE_KERNEL"] = "0"
    full = jax.jit(lambda p, ids: forward(p, config, ids))
    for flag, name in (("1", "kernel"), ("0", "xla")):
        margins = []
        for prompt, toks in zip(prompts, outs[flag]):
            seq = np.asarray(list(prompt) + list(toks), np.int32)[None]
            logits = np.asarray(full(params, jnp.asarray(seq))[0], np.float32)
            rows = logits[len(prompt) - 1 : len(seq[0]) - 1]
            margins.extend(rows.max(-1) - rows[np.arange(len(toks)), np.asarray(toks)])
        margins = np.asarray(margins)
        result[f"{name}_margin_max"] = float(margins.max())
        result[f"{name}_margin_p99"] = float(np.quantile(margins, 0.99))
        result[f"{name}_argmax_fraction"] = float(np.mean(margins == 0))
    return result


if __name__ == "__main__":
    import sys

    os.environ["HARMJAX_DECODE_KERNEL"] = "1"
    shape = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--mesh=")), None)
    main(tuple(int(x) for x in shape.split(",")) if shape else None)
