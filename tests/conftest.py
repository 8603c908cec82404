"""Test session setup: 8 fake CPU devices, so sharded code paths run on any machine."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Must happen before any backend is initialised. 8 devices lets the same test compare a
# 1-device run with an (fsdp x tensor) mesh run.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
