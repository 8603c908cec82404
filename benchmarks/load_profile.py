"""Where loading time goes on an accelerator: backend start, raw host-to-device copy, load.

Run after benchmarks/load_bench.py has written its checkpoint:
  PYTHONPATH=. python benchmarks/load_profile.py --dir=/tmp/llama8b
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import app, flags

_DIR = flags.DEFINE_string("dir", "/tmp/harmjax_llama8b", "Checkpoint written by load_bench.py.")


def main(argv):
    del argv
    import harmjax

    out = {}
    start = time.perf_counter()
    jnp.zeros(()).block_until_ready()
    out["backend_start_s"] = time.perf_counter() - start
    host = np.ones((1 << 29,), ml_dtypes.bfloat16)  # 1 GiB
    for label in ("device_put_1gib_first_s", "device_put_1gib_second_s"):
        start = time.perf_counter()
        jax.device_put(host).block_until_ready()
        out[label] = time.perf_counter() - start
    for label in ("load_first_s", "load_second_s"):
        start = time.perf_counter()
        model = harmjax.load(_DIR.value, dtype="bfloat16")
        jax.block_until_ready(model.params)
        out[label] = time.perf_counter() - start
        del model
    print(json.dumps(out, indent=2), flush=True)


if __name__ == "__main__":
    app.run(main)
