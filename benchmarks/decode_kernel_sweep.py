"""Tiling sweep of the flash-decoding kernel (harmjax/model/decode_attention.py) on a GPU.

1. Attention alone at Llama-3.1-8B batch-64 decode shapes (8 kv heads x 4 query heads,
   head_dim 128, 384-slot bf16 cache, 32 layers with their own caches in one jitted call):
   XLA's path and every kernel tiling, time per 32 layers, bytes of valid K+V read per
   second, and the largest difference from XLA's output.
2. The projections' matmuls alone at decode shapes (batch 1 and 64 rows, 32 layers' weights
   in one call; separate and fused q/k/v and gate/up, and the LM head): weight bytes read
   per second, against which the rest of the step is judged.
3. The decode step of the 8B-shaped model with random bf16 weights at batch 64 (128-token
   prompts, 256 new tokens) with XLA attention, with the best tilings, and with attention
   replaced by zeros (what the rest of the step costs); each with separate and with fused
   q/k/v and gate/up projections (`harmjax.model.fused`).

  PYTHONPATH=. python benchmarks/decode_kernel_sweep.py --out=/tmp/sweep.json
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from bench_common import LLAMA31_8B

_OUT = flags.DEFINE_string("out", "", "Result JSON.")
_TOP = flags.DEFINE_integer("top", 3, "Tilings taken to the full decode step.")
_PARTS = flags.DEFINE_list("parts", ["attention", "matmul", "step"], "Sections to run.")

B, KV, G, D, SLOTS, LAYERS = 64, 8, 4, 128, 384, 32


def _time(f, *args, repeats=20):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def attention_sweep(configs):
    from harmjax.model import decode_attention as da
    from harmjax.model import layers
    from harmjax.model.decode_attention import pallas_decode_attention

    rng = np.random.default_rng(0)
    qs = [jnp.asarray(rng.standard_normal((B, 1, KV * G, D)), jnp.bfloat16) for _ in range(LAYERS)]
    ks = [jnp.asarray(rng.standard_normal((B, KV, SLOTS, D)), jnp.bfloat16) for _ in range(LAYERS)]
    vs = [jnp.asarray(rng.standard_normal((B, KV, SLOTS, D)), jnp.bfloat16) for _ in range(LAYERS)]
    results = []
    for end in (256, 384):  # halfway through 256 new tokens, and the last step
        valid = np.zeros((B, SLOTS), bool)
        valid[:, :end] = True
        valid[: B // 2, : int(rng.integers(1, 64))] = False  # half the rows left-padded
        mask = jnp.asarray(valid[:, None, :])
        valid_bytes = int(valid.sum()) * KV * D * 2 * 2 * LAYERS

        def run(attn):
            return jax.jit(lambda qs, ks, vs: [attn(q, k, v) for q, k, v in zip(qs, ks, vs)])

        xla = run(lambda q, k, v: layers.attention(q, k, v, mask, D**-0.5, kv_heads_first=True))
        ref = [np.asarray(x, np.float32) for x in xla(qs, ks, vs)]
        t = _time(xla, qs, ks, vs)
        results.append({"end": end, "impl": "xla", "ms_32_layers": t * 1e3, "valid_tb_per_s": valid_bytes / t / 1e12})
        print(json.dumps(results[-1]), flush=True)
        for cfg in configs:
            row = {"end": end, "impl": "kernel", **cfg.__dict__}
            try:
                ker = run(lambda q, k, v, cfg=cfg: pallas_decode_attention(q, k, v, mask, D**-0.5, cfg))
                prepare = jax.jit(lambda qs, ks, vs, cfg=cfg: [da.prepare_inputs(*a, mask, cfg) for a in zip(qs, ks, vs)])
                bare = jax.jit(lambda prepared, cfg=cfg: bare_calls(prepared, cfg))
                out = ker(qs, ks, vs)
                row["max_abs_diff"] = max(float(np.abs(np.asarray(o, np.float32) - r).max()) for o, r in zip(out, ref))
                t = _time(ker, qs, ks, vs)
                row.update(ms_32_layers=t * 1e3, valid_tb_per_s=valid_bytes / t / 1e12)
                row["bare_ms_32_layers"] = _time(bare, prepare(qs, ks, vs)) * 1e3
            except Exception as e:  # a tiling Triton cannot compile is reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def bare_calls(prepared, cfg):
    """The 32 pallas_calls alone on operands prepared outside the timed call."""
    from harmjax.model import decode_attention as da

    return [da.kernel_call(*ops, D**-0.5, cfg) for ops in prepared]


def matmul_bandwidth():
    """Weight bytes read per second by the decode step's matmuls, per shape and row count."""
    shapes = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (4096, 1024), "gate/up": (4096, 14336),
              "down": (14336, 4096), "fused qkv": (4096, 6144), "fused gate_up": (4096, 28672)}
    rows = []
    key = jax.random.key(0)
    for name, (n_in, n_out) in shapes.items():
        ws = [jax.random.normal(jax.random.fold_in(key, i), (n_out, n_in), jnp.bfloat16) for i in range(LAYERS)]
        for m in (1, 64):
            x = jax.random.normal(key, (m, n_in), jnp.bfloat16)
            f = jax.jit(lambda x, ws: [jnp.einsum("bi,oi->bo", x, w) for w in ws])
            t = _time(f, x, ws)
            nbytes = LAYERS * n_out * n_in * 2
            rows.append({"matmul": name, "rows": m, "ms_32": t * 1e3, "tb_per_s": nbytes / t / 1e12})
            print(json.dumps(rows[-1]), flush=True)
        del ws
    head = jax.random.normal(key, (128256, 4096), jnp.bfloat16)
    for m in (1, 64):
        x = jax.random.normal(key, (m, 4096), jnp.bfloat16)
        f = jax.jit(lambda x, w: jnp.einsum("bi,vi->bv", x, w, preferred_element_type=jnp.float32))
        t = _time(f, x, head)
        rows.append({"matmul": "lm_head", "rows": m, "ms": t * 1e3, "tb_per_s": head.size * 2 / t / 1e12})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def decode_steps(best):
    import harmjax
    from harmjax.config import ModelConfig
    from harmjax.generate import sampler
    from harmjax.model import decode_attention, layers
    from harmjax.model.init import init_params

    hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False,
          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **LLAMA31_8B}
    config = ModelConfig.from_hf(hf)
    mesh = harmjax.make_mesh(harmjax.MeshConfig(data=1), jax.devices()[:1])
    params = init_params(config, jax.random.key(0), mesh, jnp.bfloat16)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, (B, 128)).tolist()
    original_attention = layers.attention

    def zero_decode_attention(q, k, v, mask, scale, softcap=None, kv_heads_first=False):
        if q.shape[1] == 1:
            return jnp.zeros((q.shape[0], 1, q.shape[2] * q.shape[3]), q.dtype)
        return original_attention(q, k, v, mask, scale, softcap, kv_heads_first)

    variants = [("xla", "0", None, None, False), ("xla, fused projections", "0", None, None, True)]
    variants += [(f"kernel {c}", "1", c, None, False) for c in best]
    variants += [(f"kernel {c}, fused projections", "1", c, None, True) for c in best[:1]]
    variants.append(("attention skipped", "0", None, zero_decode_attention, False))
    variants.append(("attention skipped, fused projections", "0", None, zero_decode_attention, True))
    out = []
    for name, env, cfg, patch, fuse in variants:
        os.environ["HARMJAX_DECODE_KERNEL"] = env
        if cfg is not None:
            decode_attention.DEFAULT_CONFIG = cfg
        layers.attention = patch or original_attention
        sampler.jit_prefill.cache_clear()
        sampler.jit_decode.cache_clear()
        kwargs = dict(max_new_tokens=256, pad_id=0, eos_ids=(), batch_size=B, progress=False,
                      fuse_projections=fuse)
        sampler.generate_ids(params, config, mesh, ids, **kwargs)
        steps = []
        for _ in range(2):
            s = sampler.generate_ids(params, config, mesh, ids, **kwargs).stats
            steps.append(s["decode_s"] / s["decode_steps"])
        row = {"variant": name, "decode_step_ms": min(steps) * 1e3, "prefill_ms": s["prefill_s"] * 1e3,
               "tokens_per_s": B * 256 / (s["prefill_s"] + min(steps) * s["decode_steps"])}
        out.append(row)
        print(json.dumps(row), flush=True)
    layers.attention = original_attention
    return out


def main(argv):
    del argv
    from harmjax.model.decode_attention import KernelConfig

    # Whole-row tilings (the split ones were slower in the first sweep, see docs/design.md "Generation").
    configs = [
        KernelConfig(block_k=bk, split=None, num_warps=w, num_stages=st, mma=mma)
        for mma in (True, False)
        for bk in ((32, 64) if mma else (16, 32))
        for w in (2, 4)
        for st in (2, 3, 4)
    ]
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    if "matmul" in _PARTS.value:
        result["matmul"] = matmul_bandwidth()
    sweep = attention_sweep(configs) if "attention" in _PARTS.value else []
    scored = {}
    for row in sweep:
        if row["impl"] == "kernel" and "ms_32_layers" in row and row["max_abs_diff"] < 0.05:
            key = KernelConfig(row["block_k"], row["split"], row["num_warps"], row["num_stages"])
            scored[key] = scored.get(key, 0.0) + row["ms_32_layers"]
    best = sorted(scored, key=scored.get)[: _TOP.value] or [KernelConfig()]
    result.update(attention=sweep, best=[c.__dict__ for c in best])
    if "step" in _PARTS.value:
        result["decode_step"] = decode_steps(best)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
