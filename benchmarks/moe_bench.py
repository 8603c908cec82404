"""Mixture-of-experts scan and decode speed at a real model's layer shape, random bf16 weights.

Shapes (--shape):
  gpt_oss_20b:   hidden 2880, 32 experts top-4, expert width 2880, 64 q / 8 kv heads of 64,
                 vocab 201088, 128-token window on alternate layers, fused 3-D expert tensors.
                 One GPU. The full 24 layers' float32 accumulators (4 bytes x 21B) do not fit
                 one 80 GB card beside the weights, so --num_layers reduces the depth (default 4).
  qwen3_30b_a3b: hidden 2048, 128 experts top-8, expert width 768, 32 q / 4 kv heads of 128,
                 vocab 151936, per-expert tensors. Meant for 2 GPUs (FSDP over both).
  tiny:          a CPU smoke test of every measurement (2 layers, batch 2 x 64 tokens, cache 64,
                 3 repeats unless those flags are given).

Memory (JSON lines with part "memory"): first an estimate (bf16 weights, float32 accumulators,
the largest step's activations; a lower bound), then XLA's own figure for each scan program once
compiled; either one over the device's limit stops the run with a one-line error before it runs.
Each record carries the device's peak bytes so far. XLA (CPU, and CUDA by default) runs
ragged_dot as a dense dot over every expert with masked operand copies, so the scan's memory
grows with experts x routed rows (docs/known_gaps.md has XLA's CPU figures per shape): on an
80 GB card run gpt_oss_20b with --num_layers=2, qwen3_30b_a3b with --num_layers=2 --batch=2.

Measurements, one JSON line each:
  scan:   one harm accumulation step (tokens sorted by expert, ragged_dot grouped matmuls, the
          probes' per-expert gradients: `harmjax.attribution.step.WholeStep`), and the same
          statistic (sum of gradients) by plain autodiff through the dense all-experts path.
          MFU = 6 x active_params x tokens / step time / the card's measured bf16 matmul rate,
          active_params = layers x (q,k,v,o + router + top_k x 3 x hidden x expert width) +
          vocab x hidden (lm_head); embeddings are a lookup and not counted.
  decode: one B=1 decode step with the KV cache (cache of --cache_len tokens) per path
          (gather, ragged, dense). Floor = bytes read per token / measured copy bandwidth, with
          bytes = layers x (attention + router + top_k experts' matrices and biases) + lm_head
          + the KV cache; reported as step / floor.

  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 PYTHONPATH=. python benchmarks/moe_bench.py --shape=gpt_oss_20b --num_layers=2
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 PYTHONPATH=. python benchmarks/moe_bench.py --shape=gpt_oss_20b  # H200
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 PYTHONPATH=. python benchmarks/moe_bench.py --shape=qwen3_30b_a3b --num_layers=2 --batch=2
  PYTHONPATH=. python benchmarks/moe_bench.py --shape=tiny
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

from absl import app, flags
from bench_common import copy_bandwidth, matmul_tflops

_SHAPE = flags.DEFINE_enum("shape", "gpt_oss_20b", ["gpt_oss_20b", "qwen3_30b_a3b", "tiny"], "Model shape.")
_LAYERS = flags.DEFINE_integer("num_layers", 4, "Decoder layers (the full depth's accumulators do not fit).")
_BATCH = flags.DEFINE_integer("batch", 8, "Scan: examples per step.")
_SEQ = flags.DEFINE_integer("seq", 256, "Scan: tokens per example.")
_CACHE = flags.DEFINE_integer("cache_len", 512, "Decode: KV cache length.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (median).")
_PARTS = flags.DEFINE_list("parts", ["scan", "decode"], "Which measurements.")

SHAPES = {
    "gpt_oss_20b": dict(model_type="gpt_oss", moe_layout="fused", vocab_size=201088, hidden_size=2880,
                        intermediate_size=2880, moe_intermediate_size=2880, num_experts=32, num_experts_per_tok=4,
                        num_heads=64, num_kv_heads=8, head_dim=64, sliding_window=128, router="topk_softmax",
                        swiglu_limit=7.0, attn_sinks=True, qkv_bias=True, o_bias=True, rms_norm_eps=1e-5,
                        max_position_embeddings=131072),
    "qwen3_30b_a3b": dict(model_type="qwen3_moe", moe_layout="qwen", vocab_size=151936, hidden_size=2048,
                          intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          num_heads=32, num_kv_heads=4, head_dim=128, qk_norm="head", rms_norm_eps=1e-6,
                          max_position_embeddings=40960),
    "tiny": dict(model_type="gpt_oss", moe_layout="fused", vocab_size=512, hidden_size=64, intermediate_size=64,
                 moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, sliding_window=8, router="topk_softmax", swiglu_limit=7.0, attn_sinks=True,
                 qkv_bias=True, o_bias=True, max_position_embeddings=1024),
}


# The tiny shape's flag defaults, so the CPU smoke test stays well under a minute (compile time
# dominates there); an explicitly given flag wins.
TINY_FLAGS = dict(num_layers=2, batch=2, seq=64, cache_len=64, repeats=3)
GIB = 2**30


def _apply_tiny_defaults() -> None:
    if _SHAPE.value != "tiny":
        return
    for name, value in TINY_FLAGS.items():
        if not flags.FLAGS[name].present:
            flags.FLAGS[name].value = value


def _config():
    from harmjax.config import ModelConfig

    shape = dict(SHAPES[_SHAPE.value])
    n = _LAYERS.value
    window = shape.pop("sliding_window", None)
    types = tuple("sliding" if window and i % 2 == 0 else "full" for i in range(n))
    return ModelConfig(num_layers=n, layer_types=types, sliding_window=window, **shape)


def active_params(c) -> int:
    """Parameters one token's forward multiplies by (see the module docstring)."""
    d, m = c.hidden_size, c.moe_intermediate_size
    attn = 2 * d * c.num_heads * c.head_dim + 2 * d * c.num_kv_heads * c.head_dim
    return c.num_layers * (attn + c.num_experts * d + c.num_experts_per_tok * 3 * d * m) + c.vocab_size * d


def _median_time(fn, *args) -> float:
    import jax
    import numpy as np

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _peak_bytes() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}  # None on CPU
    return stats.get("peak_bytes_in_use")


def _emit(**record) -> None:
    peak = _peak_bytes()
    extra = {} if peak is None else {"device_peak_gib": round(peak / GIB, 2)}
    print(json.dumps({"shape": _SHAPE.value, "num_layers": _LAYERS.value, **record, **extra}), flush=True)


def memory_estimate(config, batch: int, seq: int) -> dict[str, float]:
    """GiB the scan step needs on one device if XLA frees each layer's buffers before the next
    (a lower bound: `_compile_checked` prints XLA's own figure for the compiled program).

    weights: bf16, every parameter. accumulators: float32 over the scored matrices (donated,
    so updated in place). scan_activations, float32 with cotangents: the logits (values,
    log-softmax, gradient), the remat'd residual stream, one recomputed layer's routed rows
    and attention scores, that layer's per-expert weight gradients, and its ragged_dots made
    dense: XLA on CPU, and on GPU outside cuDNN's grouped GEMM, computes a ragged_dot as a dense
    one over every expert with masked copies of its operands ((experts, rows, in) and, for the
    weight gradient, (experts, rows, out), float32). dense_step: the dense reference's every
    expert on every token for one layer, and bf16 gradients of the scored matrices.
    """
    from harmjax.attribution.core import names_for
    from harmjax.model.param_specs import param_specs

    c = config
    specs = param_specs(c)
    weights = 2 * sum(math.prod(s.shape) for s in specs.values())
    scored = sum(math.prod(specs[n].shape) for n in names_for(c, None))
    n, d, m, e, k = batch * seq, c.hidden_size, c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok
    shared = 3 * 4 * n * c.vocab_size + 2 * 4 * n * d * c.num_layers + 2 * 4 * batch * c.num_heads * seq * seq
    routed = 2 * 4 * n * k * (2 * d + 3 * m)
    densified = 4 * e * n * k * ((d + 2 * m) + (m + d))
    ragged = shared + routed + 4 * scored // c.num_layers + densified
    dense = shared + 2 * 6 * e * n * (d + 3 * m) + 2 * scored
    est = {"weights": weights, "accumulators": 4 * scored, "scan_activations": ragged, "dense_step": dense}
    est["total"] = weights + 4 * scored + max(ragged, dense)
    return {key: round(v / GIB, 2) for key, v in est.items()}


def _device_memory() -> tuple[int | None, int]:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}  # None on CPU
    return stats.get("bytes_limit"), stats.get("bytes_in_use", 0)


def check_memory(config) -> None:
    """Print `memory_estimate` and stop early when even that exceeds the device's limit."""
    est = memory_estimate(config, _BATCH.value, _SEQ.value)
    limit, _ = _device_memory()
    _emit(part="memory", path="estimate", estimate_gib=est,
          device_limit_gib=None if limit is None else round(limit / GIB, 2))
    if limit is not None and est["total"] * GIB > limit:
        raise SystemExit(f"Estimated {est['total']} GiB exceeds the device's {limit / GIB:.1f} GiB: "
                         "lower --num_layers or --batch (or raise XLA_PYTHON_CLIENT_MEM_FRACTION).")


def _compile_checked(lowered, path: str):
    """Compile, print XLA's memory figure for the program, and stop with a one-line error
    before running it when its temporaries and outputs do not fit beside what is allocated."""
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    if m is None:
        return compiled
    need = m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    limit, in_use = _device_memory()
    _emit(part="memory", path=path, xla_arguments_gib=round(m.argument_size_in_bytes / GIB, 2),
          xla_temp_gib=round(m.temp_size_in_bytes / GIB, 2), xla_new_gib=round(need / GIB, 2),
          in_use_gib=round(in_use / GIB, 2), device_limit_gib=None if limit is None else round(limit / GIB, 2))
    if limit is not None and in_use + need > limit:
        raise SystemExit(f"The {path} step needs {need / GIB:.1f} GiB beside {in_use / GIB:.1f} GiB in use, "
                         f"over the device's {limit / GIB:.1f} GiB: lower --num_layers or --batch.")
    return compiled


def bench_scan(config, params, mesh, peak: float) -> None:
    """Harm step time and active-parameter MFU, ragged (the scan) vs dense (plain autodiff)."""
    import jax
    import jax.numpy as jnp

    from harmjax.attribution.core import names_for
    from harmjax.attribution.step import WholeStep, init_accumulators
    from harmjax.model.decoder import forward
    from harmjax.model.loss import mean_nll_per_example
    from harmjax.tree import flatten, unflatten

    b, t = _BATCH.value, _SEQ.value
    ids = jax.random.randint(jax.random.key(1), (b, t), 0, config.vocab_size, jnp.int32)
    ones = jnp.ones((b, t), jnp.int32)
    names = names_for(config, None)
    tokens = b * t
    flops = 6 * active_params(config) * tokens
    step = WholeStep(config, mesh, names, "harm", remat=True, chunk=8, kernel="off")
    state = {"accs": init_accumulators(config, mesh, names)}
    compiled = _compile_checked(step.lower(params, state["accs"], ids, ones, ones), "ragged")

    def ragged():  # the accumulators are donated: each step takes the last one's
        state["accs"] = compiled(params, state["accs"], ids, ones, ones)[0]
        return state["accs"]

    t_ragged = _median_time(ragged)
    _emit(part="scan", path="ragged", batch=b, seq=t, step_s=t_ragged, tokens_per_s=tokens / t_ragged,
          active_params=active_params(config), mfu=flops / t_ragged / (peak * 1e12), peak_tflops=peak)

    dense_cfg = dataclasses.replace(config, moe_impl="dense")

    def dense(params):
        def loss(scored):
            p = unflatten({**flatten(params), **scored})
            logits = forward(p, dense_cfg, ids, ones, remat=True)
            return mean_nll_per_example(logits, ids, ones).sum()
        return jax.grad(loss)({n: flatten(params)[n] for n in names})

    t_dense = _median_time(_compile_checked(jax.jit(dense).lower(params), "dense"), params)
    _emit(part="scan", path="dense", batch=b, seq=t, step_s=t_dense, tokens_per_s=tokens / t_dense,
          mfu=flops / t_dense / (peak * 1e12), ragged_speedup=t_dense / t_ragged)


def floor_bytes(config, cache_len: int) -> int:
    """Bytes one B=1 decode step must read (see the module docstring), bf16."""
    c = config
    d, m = c.hidden_size, c.moe_intermediate_size
    attn = 2 * d * c.num_heads * c.head_dim + 2 * d * c.num_kv_heads * c.head_dim
    experts = c.num_experts_per_tok * (3 * d * m + (3 * m + d if c.moe_layout == "fused" else 0))
    kv = 2 * c.num_kv_heads * c.head_dim * cache_len
    return 2 * (c.num_layers * (attn + c.num_experts * d + experts + kv) + c.vocab_size * d)


def bench_decode(config, params, bandwidth: float) -> None:
    """B=1 decode step per MoE path against the bandwidth floor."""
    import jax
    import jax.numpy as jnp

    from harmjax.generate.kv_cache import init_cache
    from harmjax.model import moe
    from harmjax.model.decoder import hidden_states, logits_from_hidden

    length = _CACHE.value
    stacked = moe.stack_experts(params, config)  # per-expert files: stacked once, as generation would
    floor = floor_bytes(config, length) / bandwidth
    mask = jnp.ones((1, length), jnp.int32)
    for impl in ("gather", "ragged", "dense"):
        cfg = dataclasses.replace(config, moe_impl=impl)

        @jax.jit
        def step(params, cache, token):
            h, cache = hidden_states(params, cfg, token, mask, kv_cache=cache, cache_index=length - 1)
            return logits_from_hidden(params, cfg, h[:, -1]), cache

        cache = init_cache(config, 1, length, jnp.bfloat16)
        token = jnp.zeros((1, 1), jnp.int32)
        t = _median_time(step, stacked, cache, token)
        _emit(part="decode", path=impl, cache_len=length, step_s=t, floor_s=floor, ratio_to_floor=t / floor,
              bytes_per_token=floor_bytes(config, length), bandwidth_bytes_per_s=bandwidth)


def main(_):
    import jax
    import jax.numpy as jnp

    from harmjax.model.init import init_params
    from harmjax.sharding import MeshConfig, make_mesh

    _apply_tiny_defaults()
    config = _config()
    check_memory(config)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1))
    params = init_params(config, jax.random.key(0), mesh, jnp.bfloat16)
    tiny = _SHAPE.value == "tiny"
    peak = matmul_tflops(256 if tiny else 8192)
    if "scan" in _PARTS.value:
        bench_scan(config, params, mesh, peak)
    if "decode" in _PARTS.value:
        bench_decode(config, params, copy_bandwidth(0.01 if tiny else 2.0)["bytes_per_s"])


if __name__ == "__main__":
    app.run(main)
