"""Fine-tuning throughput: rsLoRA (r=32, all 7 projections) on the Llama-3.1-8B shape, and
optionally full fine-tuning of a smaller (Llama-3.2-1B-shaped) model.

Random bfloat16 weights on the device, random token batches whose second half is the
"response" (loss mask), one jitted `harmjax.train` step per optimizer step: gradient
accumulation over `--accum` micro-batches of `--micro_batch` x `--seq` tokens, AdamW, clipping.
Compile excluded (one warm-up step per configuration).

FLOPs per trained token (model FLOPs; rematerialisation is not counted):
  frozen weights (LoRA):  4 N      forward 2N + input-gradient 2N, N = matmul weights of the
                                    decoder blocks plus the LM head (embedding lookups are free)
  trained weights (full): 6 N      plus the weight gradient 2N
  attention:              12 * layers * seq * (heads * head_dim)
                                    QK^T and AV forward (4 * seq * q_dim per layer, the full
                                    square, as computed) and twice that backward
  LoRA:                   6 * r * (in + out) per adapted matrix (forward, input grad, weight grads)
MFU = FLOPs/token * tokens/s / 989e12 (H100/H200 SXM bf16 dense peak).

  PYTHONPATH=. python benchmarks/finetune_bench.py --micro_batches=4,8 --seq=512   # GPU
  PYTHONPATH=. python benchmarks/finetune_bench.py --tiny --out=/tmp/ft_tiny.json   # CPU smoke test
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

from absl import app, flags
from bench_common import LLAMA31_8B

_TINY = flags.DEFINE_bool("tiny", False, "Tiny shapes (CPU smoke test).")
_MICRO = flags.DEFINE_list("micro_batches", ["4", "8"], "Micro-batch sizes to time (LoRA).")
_SEQ = flags.DEFINE_integer("seq", 512, "Tokens per sequence.")
_ACCUM = flags.DEFINE_integer("accum", 1, "Micro-batches per optimizer step.")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise each block in the backward pass.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed optimizer steps per configuration.")
_RANK = flags.DEFINE_integer("rank", 32, "LoRA rank (alpha = 2 * rank, rsLoRA).")
_FULL = flags.DEFINE_bool("full", True, "Also time full fine-tuning (7 projections) of the 1B shape.")
_FULL_MICRO = flags.DEFINE_integer("full_micro_batch", 4, "Micro-batch of the full fine-tuning run.")
_OUT = flags.DEFINE_string("out", "", "Result JSON (default benchmarks/results/<date>_<device>_finetune.json).")

PEAK_FLOPS = 989e12  # H100/H200 SXM bf16 dense

# Llama-3.2-1B's shape (untied head here, like the 8B) for the full fine-tuning number.
LLAMA32_1B = dict(LLAMA31_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
            max_position_embeddings=1024, rope_theta=10000.0)


def hf_config(shape: dict) -> dict:
    """An HF Llama config.json dict of `shape`."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **shape}


def flops_per_token(config, seq: int, lora_cfg=None) -> dict:
    """Model FLOPs per trained token, by part (see the module docstring)."""
    from harmjax.model.param_specs import param_specs
    from harmjax.train.lora import adapted_weight_names

    specs = param_specs(config)
    n_mat = sum(s.shape[0] * s.shape[1] for n, s in specs.items()
                if len(s.shape) == 2 and n != "model.embed_tokens.weight")
    if config.tie_word_embeddings:
        n_mat += config.vocab_size * config.hidden_size
    attention = 12 * config.num_layers * seq * config.num_heads * config.head_dim
    if lora_cfg is None:
        return {"weights": 6 * n_mat, "attention": attention, "lora": 0, "matmul_params": n_mat}
    lora = sum(6 * lora_cfg.r * sum(specs[n].shape) for n in adapted_weight_names(config, lora_cfg))
    return {"weights": 4 * n_mat, "attention": attention, "lora": lora, "matmul_params": n_mat}


def run_one(config, params, mesh, micro: int, lora_cfg=None) -> dict:
    """Times `--steps` optimizer steps of one configuration; returns its numbers."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from harmjax.sharding import param_shardings
    from harmjax.train import TrainConfig
    from harmjax.train.lora import adapter_shardings, init_lora
    from harmjax.train.optim import lr_schedule, make_optimizer, trainable_names
    from harmjax.train.step import StepSpec, init_state, make_train_step, stacked_batch_sharding
    from harmjax.tree import flatten, unflatten

    seq, accum = _SEQ.value, _ACCUM.value
    cfg = TrainConfig(lr=1e-5, warmup_steps=1, batch_size=micro * accum, micro_batch_size=micro,
                      max_length=seq, remat=_REMAT.value)
    total = _STEPS.value + 1
    p_sh = param_shardings(config, mesh)
    if lora_cfg is not None:
        trainable = init_lora(jax.random.key(1), config, lora_cfg, mesh)
        t_sh, frozen, frozen_sh = adapter_shardings(config, lora_cfg, mesh), params, p_sh
        spec = StepSpec(config, lora=lora_cfg, remat=cfg.remat)
    else:
        names = set(trainable_names(params, "linear"))
        flat, flat_sh = flatten(params), flatten(p_sh)
        to_f32 = {s: jax.jit(lambda x: x.astype(jnp.float32), out_shardings=s) for s in set(flat_sh.values())}
        trainable = unflatten({n: to_f32[flat_sh[n]](flat[n]) for n in flat if n in names})
        t_sh = unflatten({n: flat_sh[n] for n in flat if n in names})
        frozen = unflatten({n: x for n, x in flat.items() if n not in names})
        frozen_sh = unflatten({n: s for n, s in flat_sh.items() if n not in names})
        spec = StepSpec(config, dtypes=tuple((n, "bfloat16") for n in flat if n in names), remat=cfg.remat)
    tx = make_optimizer(cfg, total, trainable)
    state, state_sh = init_state(tx, trainable, t_sh, mesh, 0)
    step = make_train_step(spec, tx, lr_schedule(cfg, total), mesh, state_sh, frozen_sh, None)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, (accum, micro, seq)).astype(np.int32)
    loss_mask = np.zeros_like(ids)
    loss_mask[..., seq // 2:] = 1
    batch = jax.device_put({"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask},
                           stacked_batch_sharding(mesh))
    start = time.perf_counter()
    state, m = step(state, frozen, None, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        state, m = step(state, frozen, None, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    tokens = micro * accum * seq
    fl = flops_per_token(config, seq, lora_cfg)
    per_token = fl["weights"] + fl["attention"] + fl["lora"]
    tps = tokens / step_s
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())
    out = {"mode": "lora" if lora_cfg else "full", "micro_batch": micro, "accum": accum, "seq": seq,
           "remat": cfg.remat, "step_s": step_s, "step_s_all": times, "compile_and_first_step_s": compile_s,
           "tokens_per_step": tokens, "tokens_per_s": tps, "flops_per_token": fl,
           "tflops_per_s": per_token * tps / 1e12, "mfu": per_token * tps / PEAK_FLOPS,
           "peak_gib": peak / 2**30, "loss": float(m["loss"])}
    print(f"{out['mode']} micro {micro} x accum {accum} x seq {seq}: {tps:.0f} tokens/s, step {step_s * 1e3:.1f} ms, "
          f"MFU {out['mfu'] * 100:.1f}%, peak {out['peak_gib']:.1f} GiB", flush=True)
    del state
    return out


def main(argv):
    del argv
    if _TINY.value:
        for flag, value in ((_MICRO, ["2", "4"]), (_SEQ, 32), (_STEPS, 2), (_RANK, 4)):
            if not flags.FLAGS[flag.name].present:
                flags.FLAGS[flag.name].value = value
    import jax
    import jax.numpy as jnp

    import harmjax
    from harmjax.config import ModelConfig
    from harmjax.model.init import init_params
    from harmjax.train import LoraConfig

    device = jax.devices()[0]
    results = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "tiny": _TINY.value,
               "device": f"{device.platform}:{device.device_kind}", "jax": jax.__version__,
               "peak_flops": PEAK_FLOPS, "runs": []}
    kind = device.device_kind.replace(" ", "_").lower()
    out = _OUT.value or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"{results['date']}_{kind}_finetune{'_tiny' if _TINY.value else ''}.json")
    mesh = harmjax.make_mesh(harmjax.MeshConfig(data=1), jax.devices()[:1])
    lora_cfg = LoraConfig(r=_RANK.value, alpha=2.0 * _RANK.value, use_rslora=True)

    def write():
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=2)

    config = ModelConfig.from_hf(hf_config(TINY if _TINY.value else LLAMA31_8B))
    params = init_params(config, jax.random.key(0), mesh, jnp.bfloat16)
    results["lora_shape"] = "tiny" if _TINY.value else "llama-3.1-8b"
    for micro in (int(x) for x in _MICRO.value):
        try:
            results["runs"].append(run_one(config, params, mesh, micro, lora_cfg))
        except Exception as e:  # an OOM at one size must not lose the others
            results["runs"].append({"mode": "lora", "micro_batch": micro, "error": repr(e)[:2000]})
            print(f"lora micro {micro} failed: {e!r}"[:500], flush=True)
        write()
    del params
    if _FULL.value:
        config = ModelConfig.from_hf(hf_config(TINY if _TINY.value else LLAMA32_1B))
        params = init_params(config, jax.random.key(0), mesh, jnp.bfloat16)
        results["full_shape"] = "tiny" if _TINY.value else "llama-3.2-1b"
        try:
            results["runs"].append(run_one(config, params, mesh, _FULL_MICRO.value if not _TINY.value else 2))
        except Exception as e:
            results["runs"].append({"mode": "full", "error": repr(e)[:2000]})
            print(f"full fine-tuning failed: {e!r}"[:500], flush=True)
        write()
    write()
    summary = {"device": results["device"], "out": out,
               "runs": [{k: r.get(k) for k in ("mode", "micro_batch", "seq", "tokens_per_s", "step_s", "mfu",
                                                 "peak_gib", "error") if k in r} for r in results["runs"]]}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    app.run(main)
