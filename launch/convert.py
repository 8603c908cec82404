"""Convert a checkpoint (HF directory, hub id, GGUF file, or 'embedded') to an orbax params
checkpoint and/or a Hugging Face export.

  python -m launch.convert --source=embedded --out_orbax=/tmp/smollm2_orbax --out_hf=/tmp/smollm2_hf
  python -m launch.convert --source=path/to/model.gguf --dtype=bfloat16 --out_hf=/tmp/hf
"""

from __future__ import annotations

from absl import app, flags

import harmjax
from harmjax.sharding import MeshConfig
from launch.common import init_runtime, resolve_model_source, run_app

_SOURCE = flags.DEFINE_string("source", None, "HF directory, .gguf file, hub id, or 'embedded'.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Parameter dtype (default: the checkpoint's).")
_OUT_ORBAX = flags.DEFINE_string("out_orbax", None, "Write an orbax params checkpoint here.")
_OUT_HF = flags.DEFINE_string("out_hf", None, "Write a transformers-loadable directory here.")
_MESH = flags.DEFINE_list("mesh", ["-1", "1", "1"], "Mesh sizes data,fsdp,tensor (-1 = the rest).")


def main(argv):
    del argv
    init_runtime()
    if not (_OUT_ORBAX.value or _OUT_HF.value):
        raise app.UsageError("Give --out_orbax and/or --out_hf.")
    data, fsdp, tensor = (int(x) for x in _MESH.value)
    model = harmjax.load(resolve_model_source(_SOURCE.value), dtype=_DTYPE.value, mesh=MeshConfig(data, fsdp, tensor))
    if _OUT_ORBAX.value:
        print(f"orbax checkpoint (load with harmjax.load): {harmjax.save_orbax(model, _OUT_ORBAX.value)}")
    if _OUT_HF.value:
        print(f"HF export: {harmjax.save_hf(model, _OUT_HF.value)}")
    print(f"{model.config.model_type}: {model.num_params():,} parameters, {model.config.num_layers} layers")


if __name__ == "__main__":
    run_app(main)
