"""Generation throughput: harmjax's KV-cache sampler against transformers' `generate`.

A Llama-3.1-8B-shaped model with random bfloat16 weights, 128-token prompts, 256 new tokens
(no early stop), batch 1 and batch 64:
  - harmjax: `harmjax.generate.generate_ids` (jitted prefill + `lax.while_loop` decode);
    compile excluded (one warm-up call of the same shapes), prefill and decode timed apart.
  - transformers: greedy `generate` in PyTorch on the same card, same config, random bf16
    weights, `attn_implementation="sdpa"`; run in a subprocess first, so the two frameworks
    never share the card's memory.
  - the card's copy bandwidth (device-to-device copy of a ~4 GB array, bytes read + written
    over time; through JAX and through PyTorch, the higher taken), and the batch-1 decode step against its floor: the bytes one step must read
    (every weight except the embedding table, of which one row per sequence is gathered,
    plus the whole KV cache) over that bandwidth.

  PYTHONPATH=. python benchmarks/generate_bench.py              # GPU, writes benchmarks/results/
  PYTHONPATH=. python benchmarks/generate_bench.py --tiny --out=/tmp/gen_tiny.json   # CPU smoke test
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from bench_common import LLAMA31_8B, copy_bandwidth

_TINY = flags.DEFINE_bool("tiny", False, "Tiny shapes (CPU smoke test).")
_BATCHES = flags.DEFINE_list("batches", ["1", "64"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens.")
_NEW = flags.DEFINE_integer("new_tokens", 256, "New tokens per sequence (no early stop).")
_TORCH = flags.DEFINE_bool("torch", True, "Also time transformers' generate.")
_COPY_GB = flags.DEFINE_float("copy_gb", 4.0, "Size of the array copied to measure bandwidth.")
_OUT = flags.DEFINE_string("out", "", "Result JSON (default benchmarks/results/<date>_<device>_generate.json).")
_ENGINE = flags.DEFINE_enum("engine", "jax", ["jax", "torch"], "Internal: the torch subprocess.")
_TORCH_OUT = flags.DEFINE_string("torch_out", "", "Internal: where the torch subprocess writes.")

TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
    max_position_embeddings=1024, rope_theta=10000.0,
)


def hf_config_dict() -> dict:
    """The benchmark model as an HF config.json dict (shared by both engines)."""
    shape = TINY if _TINY.value else LLAMA31_8B
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **shape}


def prompts(batch: int, vocab: int, seed: int = 0):
    """Random prompt ids (batch, prompt_len), ids >= 3 so none is a special token."""
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, (batch, _PROMPT.value)).astype(np.int64)


# ----------------------------------------------------------------------------- transformers
def torch_engine() -> dict:
    """transformers' greedy generate on the default torch device; tokens/s per batch size."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = transformers.AutoConfig.for_model(**hf_config_dict())
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):  # initialise on the card: an 8B init on the host takes minutes
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    init_s = time.perf_counter() - start
    model.generation_config.eos_token_id = None  # never stop early: exactly new_tokens tokens
    model.generation_config.pad_token_id = 0
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "init_s": init_s, "runs": {}}
    if device == "cuda":
        try:  # a secondary reference: its failure must not lose the generate timings
            out["copy"] = torch_copy_bandwidth(_COPY_GB.value)
            print(f"torch copy bandwidth {out['copy']['bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
        except Exception as e:  # noqa: BLE001
            out["copy_error"] = repr(e)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for b in (int(x) for x in _BATCHES.value):
        ids = torch.tensor(prompts(b, cfg.vocab_size), device=device)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)  # warm-up
            sync()
            start = time.perf_counter()
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=_NEW.value, do_sample=False)
            sync()
        wall = time.perf_counter() - start
        new = gen.shape[1] - ids.shape[1]
        out["runs"][str(b)] = {"batch": b, "new_tokens": new, "wall_s": wall, "tokens_per_s": b * new / wall}
        print(f"transformers batch {b}: {b * new / wall:.1f} tokens/s ({wall:.2f} s)", flush=True)
    return out


def torch_copy_bandwidth(gb: float, repeats: int = 10) -> dict:
    """Device-to-device memcpy rate through PyTorch, (read + written bytes) / time (median)."""
    import torch

    src = torch.ones(int(gb * 1e9) // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    t = sorted(times)[len(times) // 2]
    del src, dst
    torch.cuda.empty_cache()
    return {"array_bytes": 4 * (int(gb * 1e9) // 4), "seconds": t, "bytes_per_s": 2 * 4 * (int(gb * 1e9) // 4) / t}


def run_torch_subprocess() -> dict:
    """Runs `torch_engine` in a fresh process (before JAX takes the card) and reads its JSON."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "torch.json")
        args = [sys.executable, os.path.abspath(__file__), "--engine=torch", f"--torch_out={path}",
                f"--batches={','.join(_BATCHES.value)}", f"--prompt_len={_PROMPT.value}",
                f"--new_tokens={_NEW.value}", f"--tiny={_TINY.value}"]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], flush=True)
            return {"error": proc.stderr[-2000:]}
        with open(path) as f:
            return json.load(f)


# ----------------------------------------------------------------------------- JAX
def jax_engine(bandwidth: float) -> dict:
    """harmjax's sampler: per batch size, prefill and decode times, tokens/s, step vs floor."""
    import jax
    import jax.numpy as jnp

    import harmjax
    from harmjax.config import ModelConfig
    from harmjax.generate import cache_bytes, generate_ids
    from harmjax.model.init import init_params

    config = ModelConfig.from_hf(hf_config_dict())
    mesh = harmjax.make_mesh(harmjax.MeshConfig(data=1), jax.devices()[:1])
    start = time.perf_counter()
    params = init_params(config, jax.random.key(0), mesh, jnp.bfloat16)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - start
    leaves = jax.tree.leaves(params)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    embed = params["model"]["embed_tokens"]["weight"]
    read_weight_bytes = weight_bytes - embed.size * embed.dtype.itemsize  # rows gathered, not read
    out = {"params": sum(x.size for x in leaves), "weight_bytes": weight_bytes,
           "weight_bytes_read_per_step": read_weight_bytes, "init_s": init_s, "runs": {}}
    for b in (int(x) for x in _BATCHES.value):
        ids = prompts(b, config.vocab_size).tolist()
        kwargs = dict(max_new_tokens=_NEW.value, pad_id=0, eos_ids=(), batch_size=b, progress=False)
        start = time.perf_counter()
        generate_ids(params, config, mesh, ids, **kwargs)  # compiles prefill + decode
        first_s = time.perf_counter() - start
        res = generate_ids(params, config, mesh, ids, **kwargs)
        s = res.stats
        assert all(len(t) == _NEW.value for t in res.tokens), "generation stopped early"
        cache_len = s["gen_buffer"] + max(16, 1 << (_PROMPT.value - 1).bit_length())
        kv = cache_bytes(config, b, cache_len, jnp.bfloat16)
        step = s["decode_s"] / s["decode_steps"]
        floor = (read_weight_bytes + kv) / bandwidth
        run = {
            "batch": b, "new_tokens": _NEW.value, "prefill_s": s["prefill_s"], "decode_s": s["decode_s"],
            "wall_s": s["prefill_s"] + s["decode_s"], "compile_and_first_run_s": first_s,
            "tokens_per_s": b * _NEW.value / (s["prefill_s"] + s["decode_s"]),
            "decode_tokens_per_s": b * s["decode_steps"] / s["decode_s"],
            "decode_step_s": step, "kv_cache_bytes": kv, "step_floor_s": floor,
            "step_over_floor": step / floor,
            "step_over_floor_all_weights": step / ((weight_bytes + kv) / bandwidth),
        }
        out["runs"][str(b)] = run
        print(f"harmjax batch {b}: {run['tokens_per_s']:.1f} tokens/s, decode step {step * 1e3:.2f} ms "
              f"(floor {floor * 1e3:.2f} ms, x{step / floor:.2f}), prefill {s['prefill_s'] * 1e3:.1f} ms",
              flush=True)
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())
    out["peak_gib"] = peak / 2**30
    return out


def _apply_tiny_defaults() -> None:
    """--tiny shrinks every size flag the user did not set, so the smoke test takes seconds."""
    for flag, value in ((_BATCHES, ["1", "8"]), (_PROMPT, 16), (_NEW, 32)):
        if not flags.FLAGS[flag.name].present:
            flags.FLAGS[flag.name].value = value


def _default_out(date: str, device_kind: str) -> str:
    kind = device_kind.replace(" ", "_").lower()
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        f"{date}_{kind}_generate{'_tiny' if _TINY.value else ''}.json")


def _write(results: dict, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)


def main(argv):
    del argv
    if _TINY.value:
        _apply_tiny_defaults()
    if _ENGINE.value == "torch":
        with open(_TORCH_OUT.value, "w") as f:
            json.dump(torch_engine(), f)
        return
    results = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
               "tiny": _TINY.value, "prompt_len": _PROMPT.value, "new_tokens": _NEW.value,
               "batches": [int(b) for b in _BATCHES.value]}
    if _TORCH.value:
        results["transformers"] = run_torch_subprocess()  # first: JAX then takes the card
    import jax

    device = jax.devices()[0]
    results.update(device=f"{device.platform}:{device.device_kind}", jax=jax.__version__)
    out = _OUT.value or _default_out(results["date"], device.device_kind)
    _write(results, out)  # partial results survive a failure below
    results["copy"] = copy_bandwidth(_COPY_GB.value / (1000 if _TINY.value else 1))
    print(f"copy bandwidth {results['copy']['bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    # The floor uses the higher of JAX's and PyTorch's copy rates: the stricter bound.
    torch_copy = results.get("transformers", {}).get("copy", {}).get("bytes_per_s", 0.0)
    results["floor_bandwidth"] = max(results["copy"]["bytes_per_s"], torch_copy)
    results["harmjax"] = jax_engine(results["floor_bandwidth"])
    ref = results.get("transformers", {}).get("runs", {})
    results["speedup_vs_transformers"] = {
        b: results["harmjax"]["runs"][b]["tokens_per_s"] / ref[b]["tokens_per_s"] for b in ref
    }
    print(json.dumps({"speedup_vs_transformers": results["speedup_vs_transformers"]}), flush=True)
    _write(results, out)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    app.run(main)
