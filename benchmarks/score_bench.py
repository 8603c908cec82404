"""Attribution-scan throughput on an accelerator, with PyTorch baselines on the same card.

Model: Llama-3.1-8B-shaped, random bfloat16 weights. Data: 412 harmful + 412 benign synthetic
examples of 256 tokens (64 prompt + 192 response tokens, response-only loss), as in the
reference settings. Each part runs in its own process (so one framework's memory pool or
peak-memory counter never leaks into another's figure):

  jax:    harmjax's scan step (`harmjax.attribution.step.jit_accumulate`, the code `harmjax.score`
          runs) for `harm` over the 412 harmful and `retain` over the 412 benign examples;
          compile time reported apart; tokens/s; MFU = 6 x params x tokens / time over the
          card's measured bf16 matmul rate; peak device memory. Also a remat run for the
          80 GB-card memory claim.
  torch_fair:  all layers in one backward per batch of 16 with gradient checkpointing, float32
          accumulators (harm); one backward per example accumulating |grad| (retain), timed on
          a subset of examples and extrapolated (said so in the output).
  torch_reference:  the reference algorithm: layer by layer, batch size 1 (L x N forward and
          backward passes, bf16 accumulation), timed on a subset of layers and examples and
          extrapolated to 32 layers x 824 examples (said so in the output).

  PYTHONPATH=. python benchmarks/score_bench.py --out=benchmarks/results/score.json
  PYTHONPATH=. python benchmarks/score_bench.py --tiny      # CPU smoke test of every part
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags
from bench_common import LLAMA31_8B_SHAPE as LLAMA31_8B, TINY_SHAPE as TINY, matmul_tflops, synthetic_examples as _synthetic

_PART = flags.DEFINE_enum("part", "all", ["all", "jax", "torch_fair", "torch_reference"], "What to run.")
_KIND = flags.DEFINE_string("kind", "harm", "jax part: score kind.")
_BATCH = flags.DEFINE_integer("batch", 16, "Examples per micro-batch.")
_REMAT = flags.DEFINE_bool("remat", False, "jax part: rematerialise blocks.")
_ABS_CHUNK = flags.DEFINE_integer("abs_chunk", 8, "jax part: examples per per-example-gradient block.")
_N = flags.DEFINE_integer("n", 412, "Examples per set.")
_SEQ = flags.DEFINE_integer("seq", 256, "Tokens per example.")
_TINY = flags.DEFINE_bool("tiny", False, "Tiny model and data (CPU smoke test).")
_OUT = flags.DEFINE_string("out", "", "Write the combined JSON here (part=all).")

def _shape() -> dict:
    return TINY if _TINY.value else LLAMA31_8B


def _params_count(shape: dict) -> int:
    d, m, v, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_layers"]
    q, kv = shape["num_heads"] * shape["head_dim"], shape["num_kv_heads"] * shape["head_dim"]
    return 2 * v * d + L * (2 * d * q + 2 * d * kv + 3 * d * m + 2 * d) + d


def run_jax() -> dict:
    """One harmjax scan (kind, batch, remat from flags) over n synthetic examples."""
    import jax
    import jax.numpy as jnp

    import harmjax
    from harmjax.attribution.core import names_for
    from harmjax.attribution.step import init_accumulators, jit_accumulate, jit_finalize
    from harmjax.config import ModelConfig, RopeConfig
    from harmjax.data.calibration import make_batches
    from harmjax.model.init import init_params

    shape = _shape()
    rope = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192)
    config = ModelConfig(**shape, rope=rope, rope_local=rope)
    mesh = harmjax.make_mesh(harmjax.MeshConfig())
    dtype = jnp.float32 if _TINY.value else jnp.bfloat16
    params = init_params(config, jax.random.key(0), mesh, dtype)
    names = names_for(config, None)
    kind = _KIND.value
    batches = make_batches(_synthetic(_N.value, _SEQ.value, shape["vocab_size"], seed=1 if kind == "harm" else 2),
                           _BATCH.value, 0, [_SEQ.value])
    step = jit_accumulate(config, mesh, names, kind, _REMAT.value, _ABS_CHUNK.value)
    finalize = jit_finalize(config, mesh, names, kind)

    start = time.perf_counter()
    accs = init_accumulators(config, mesh, names)
    b = batches[0]
    accs, loss = step(params, accs, b.input_ids, b.attention_mask, b.loss_mask)
    loss.block_until_ready()
    compile_s = time.perf_counter() - start

    del accs, loss  # free the warm-up accumulators before making the timed scan's
    accs = init_accumulators(config, mesh, names)  # the timed scan starts from zero
    jax.block_until_ready(accs)
    start = time.perf_counter()
    for b in batches:
        accs, loss = step(params, accs, b.input_ids, b.attention_mask, b.loss_mask)
    scores = finalize(params, accs)
    jax.block_until_ready(scores)
    scan_s = time.perf_counter() - start

    tokens = sum(b.num_tokens for b in batches)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())
    acc_bytes = sum(x.size * 4 for x in jax.tree.leaves(scores))
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    rate = matmul_tflops(1024 if _TINY.value else 8192)
    finite = bool(all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(scores)))
    return {
        "part": "jax", "kind": kind, "batch": _BATCH.value, "remat": _REMAT.value, "abs_chunk": _ABS_CHUNK.value,
        "examples": _N.value, "tokens": tokens, "params": n_params, "compile_s": compile_s, "scan_s": scan_s,
        "tokens_per_s": tokens / scan_s, "matmul_tflops_measured": rate,
        "mfu": 6 * n_params * tokens / scan_s / 1e12 / rate, "peak_gib": peak / 2**30, "param_gib": param_bytes / 2**30,
        "accumulator_gib": acc_bytes / 2**30, "scores_finite": finite,
    }


def _torch_model():
    import torch
    import transformers

    shape = _shape()
    cfg = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"], rms_norm_eps=1e-5, max_position_embeddings=8192,
        attn_implementation="sdpa",
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    linear = {n: p for n, p in model.named_parameters() if n.endswith("_proj.weight") and ".layers." in n}
    return model, linear, device


def _torch_loss(model, ids, loss_mask):
    import torch

    logits = model(ids).logits[:, :-1].float()
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    w = loss_mask[:, 1:].float()
    return ((nll * w).sum(-1) / w.sum(-1)).sum()


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_torch_fair() -> dict:
    """All layers in one backward per batch (gradient checkpointing), float32 accumulation."""
    import torch

    model, linear, device = _torch_model()
    model.gradient_checkpointing_enable()
    model.train()  # checkpointing is active only in train mode; no dropout in Llama
    for p in linear.values():
        p.requires_grad_(True)
    data = _synthetic(_N.value, _SEQ.value, _shape()["vocab_size"], seed=1)
    ids = torch.tensor(np.stack([t.ids for t in data]), device=device, dtype=torch.long)
    lm = torch.tensor(np.stack([t.loss_mask for t in data]), device=device)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in linear.items()}

    def harm_batch(lo, hi):
        model.zero_grad(set_to_none=True)
        _torch_loss(model, ids[lo:hi], lm[lo:hi]).backward()
        for n, p in linear.items():
            acc[n] += p.grad.float()

    harm_batch(0, _BATCH.value)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for lo in range(0, _N.value, _BATCH.value):
        harm_batch(lo, min(lo + _BATCH.value, _N.value))
    _sync(device)
    harm_s = time.perf_counter() - start

    subset = 4 if _TINY.value else 24
    start = time.perf_counter()
    for i in range(subset):
        model.zero_grad(set_to_none=True)
        _torch_loss(model, ids[i : i + 1], lm[i : i + 1]).backward()
        for n, p in linear.items():
            acc[n] += p.grad.float().abs()
    _sync(device)
    per_example = (time.perf_counter() - start) / subset
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return {
        "part": "torch_fair", "batch": _BATCH.value, "examples": _N.value, "harm_s": harm_s,
        "harm_tokens_per_s": _N.value * _SEQ.value / harm_s, "retain_s_per_example": per_example,
        "retain_examples_timed": subset, "retain_s_extrapolated": per_example * _N.value,
        "pair_s": harm_s + per_example * _N.value, "peak_gib": peak,
        "note": f"retain timed on {subset} examples and extrapolated to {_N.value}",
    }


def run_torch_reference() -> dict:
    """The reference algorithm: for each layer, for each example (batch 1), a full forward and
    backward with only that layer's linear weights requiring grad, bf16 accumulation."""
    import torch

    model, linear, device = _torch_model()
    shape = _shape()
    data = _synthetic(8, _SEQ.value, shape["vocab_size"], seed=1)
    layers_timed = 2
    examples_timed = 4 if _TINY.value else 8
    start = None
    for layer in range(layers_timed + 1):  # layer 0 is the warm-up, not timed
        if layer == 1:
            _sync(device)
            start = time.perf_counter()
        params = {n: p for n, p in linear.items() if f".layers.{layer % shape['num_layers']}." in n}
        for p in params.values():
            p.requires_grad_(True)
        acc = {n: torch.zeros_like(p) for n, p in params.items()}  # bf16, as the reference
        for t in data[:examples_timed]:
            model.zero_grad(set_to_none=True)
            ids = torch.tensor(t.ids[None], device=device, dtype=torch.long)
            _torch_loss(model, ids, torch.tensor(t.loss_mask[None], device=device)).backward()
            for n, p in params.items():
                acc[n] += p.grad
        for p in params.values():
            p.requires_grad_(False)
    _sync(device)
    per_pass = (time.perf_counter() - start) / (layers_timed * examples_timed)
    total_passes = shape["num_layers"] * 2 * _N.value
    return {
        "part": "torch_reference", "s_per_pass": per_pass, "passes_timed": layers_timed * examples_timed,
        "passes_total": total_passes, "both_sets_s_extrapolated": per_pass * total_passes,
        "note": (f"timed {layers_timed} layers x {examples_timed} examples (batch 1) and extrapolated to "
                 f"{shape['num_layers']} layers x {2 * _N.value} examples"),
    }


def _subprocess(args: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *args] + (["--tiny"] if _TINY.value else [])
    cmd += [f"--n={_N.value}", f"--seq={_SEQ.value}"]
    print("$", " ".join(cmd[1:]), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        print(out.stderr[-3000:], flush=True)
        return {"args": args, "error": out.stderr[-1500:]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def main(argv):
    del argv
    if _PART.value != "all":
        fn = {"jax": run_jax, "torch_fair": run_torch_fair, "torch_reference": run_torch_reference}[_PART.value]
        print(json.dumps(fn()), flush=True)
        return
    import jax

    device = jax.devices()[0]
    results = {"device": f"{device.platform}:{device.device_kind}", "jax": jax.__version__,
               "date": time.strftime("%Y-%m-%d"), "params_formula": _params_count(_shape())}
    results["harm"] = _subprocess(["--part=jax", "--kind=harm", f"--batch={_BATCH.value}"])
    results["retain"] = _subprocess(["--part=jax", "--kind=retain", f"--batch={_BATCH.value}",
                                     f"--abs_chunk={_ABS_CHUNK.value}"])
    results["harm_remat"] = _subprocess(["--part=jax", "--kind=harm", f"--batch={_BATCH.value}", "--remat"])
    results["torch_fair"] = _subprocess(["--part=torch_fair", f"--batch={_BATCH.value}"])
    results["torch_reference"] = _subprocess(["--part=torch_reference"])
    try:
        ours = results["harm"]["scan_s"] + results["retain"]["scan_s"]
        results["summary"] = {
            "harmjax_pair_s": ours,
            "harm_vs_fair_torch_tokens_per_s": results["harm"]["tokens_per_s"] / results["torch_fair"]["harm_tokens_per_s"],
            "retain_over_harm_tokens_per_s": results["retain"]["tokens_per_s"] / results["harm"]["tokens_per_s"],
            "speedup_vs_reference": results["torch_reference"]["both_sets_s_extrapolated"] / ours,
            "speedup_vs_fair_torch_pair": results["torch_fair"]["pair_s"] / ours,
        }
    except (KeyError, TypeError) as e:
        results["summary"] = {"error": f"a part failed: {e}"}
    print(json.dumps(results.get("summary"), indent=2), flush=True)
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
