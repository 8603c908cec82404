"""Loading speed and host memory for a large checkpoint.

Writes a Llama-3.1-8B-shaped bf16 safetensors checkpoint (4 GiB shards plus an index, as
transformers writes them) with pseudo-random values, then times `harmjax.load` onto the
requested mesh and reports GB/s and the process's peak anonymous host memory. It shows that
loading streams each device's slice from the memory-mapped files instead of building a host
copy of the model. The files are fresh in the page cache, so this measures
memory -> device, not disk.

  PYTHONPATH=. python benchmarks/load_bench.py --dir=/tmp/llama8b --mesh=1,1,1
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import app, flags

_DIR = flags.DEFINE_string("dir", "/tmp/harmjax_llama8b", "Where to write the checkpoint.")
_MESH = flags.DEFINE_list("mesh", ["-1", "1", "1"], "Mesh sizes data,fsdp,tensor.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
_LAYERS = flags.DEFINE_integer("layers", 32, "Decoder layers (fewer for a quick local run).")

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "torch_dtype": "bfloat16",
}


def _anon_kib() -> dict[str, int]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmHWM", "RssFile"):
                fields[key] = int(value.split()[0])
    return fields


class PeakAnonSampler:
    """Samples RssAnon every 20 ms in a thread; `.peak_kib` is the highest seen."""

    def __enter__(self):
        self.peak_kib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, _anon_kib()["RssAnon"])
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def write_checkpoint(directory: str) -> float:
    """Writes the checkpoint (cheap pseudo-random values); returns its size in GB."""
    from harmjax.config import ModelConfig
    from harmjax.io.safetensors_io import write_tensors
    from harmjax.model.param_specs import param_specs

    config = ModelConfig.from_hf(HF_CONFIG | {"num_hidden_layers": _LAYERS.value})
    block = (np.random.default_rng(0).standard_normal(1 << 20) * 0.02).astype(ml_dtypes.bfloat16)

    def tensors():
        for name, spec in param_specs(config).items():
            n = int(np.prod(spec.shape))
            yield name, np.resize(block, n).reshape(spec.shape)

    os.makedirs(directory, exist_ok=True)
    files = write_tensors(directory, tensors())
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(HF_CONFIG | {"num_hidden_layers": _LAYERS.value}, f)
    return sum(os.path.getsize(p) for p in files) / 1e9


def main(argv):
    del argv
    import harmjax

    start = time.perf_counter()
    size_gb = write_checkpoint(_DIR.value)
    write_s = time.perf_counter() - start
    before = _anon_kib()
    mesh = harmjax.MeshConfig(*(int(x) for x in _MESH.value))
    with PeakAnonSampler() as sampler:
        start = time.perf_counter()
        model = harmjax.load(_DIR.value, dtype="bfloat16", mesh=mesh)
        jax.block_until_ready(model.params)
        load_s = time.perf_counter() - start
    after = _anon_kib()
    out = harmjax.jit_forward(model.config, model.mesh)(model.params, jnp.ones((8, 16), jnp.int32), jnp.ones((8, 16), jnp.int32))
    results = {
        "devices": [d.device_kind for d in jax.devices()], "mesh": dict(model.mesh.shape),
        "checkpoint_gb": size_gb, "write_s": write_s, "load_s": load_s, "load_gb_per_s": size_gb / load_s,
        "rss_anon_before_gib": before["RssAnon"] / 2**20, "rss_anon_after_gib": after["RssAnon"] / 2**20,
        "rss_anon_peak_during_load_gib": sampler.peak_kib / 2**20,
        "vm_hwm_gib": after["VmHWM"] / 2**20,
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "forward_ok": bool(jnp.isfinite(out).all()),
    }
    print(json.dumps(results, indent=2), flush=True)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
