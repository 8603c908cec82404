"""Multi-accelerator check: the same logits and the same exported tensors on every mesh.

For tiny random transformers models (built here with PyTorch on the CPU), loads the weights
onto a 1-device mesh and onto meshes over all local devices (data, fsdp, tensor), runs the
jitted, explicitly sharded forward, and compares; then exports the sharded params with
`save_hf` and compares the files with the source tensors.

  PYTHONPATH=. python benchmarks/mesh_check.py
"""

from __future__ import annotations

import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")


def main(argv):
    del argv
    import harmjax
    from harmjax.sharding import MeshConfig, make_mesh
    from safetensors.numpy import load_file
    from tests.hf_reference import left_padded_batch, save_tiny, tiny_hf_model

    n = jax.device_count()
    results = {"devices": [str(d.device_kind) for d in jax.devices()], "checks": {}}
    meshes = {"data": MeshConfig(data=n), "fsdp": MeshConfig(data=1, fsdp=n), "tensor": MeshConfig(data=1, tensor=n)}
    with jax.default_matmul_precision("highest"), tempfile.TemporaryDirectory() as tmp:
        for family in ("llama", "gemma2", "qwen3"):
            hf_model = tiny_hf_model(family, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
            src = save_tiny(hf_model, f"{tmp}/{family}")
            one = harmjax.load(src, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
            ids, mask, _ = left_padded_batch(batch=2 * n if n > 1 else 3)
            if ids.shape[0] < 3:
                ids, mask, _ = left_padded_batch(batch=4)
            ref = np.asarray(harmjax.jit_forward(one.config, one.mesh)(one.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
            source = {k: v.numpy() for k, v in hf_model.state_dict().items()}
            for label, mesh_config in meshes.items():
                model = harmjax.load(src, mesh=mesh_config)
                out = harmjax.jit_forward(model.config, model.mesh)(
                    model.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
                )
                export = harmjax.save_hf(model, f"{tmp}/{family}-{label}-export")
                tensors = load_file(f"{export}/model.safetensors")
                same = all(np.array_equal(tensors[k], source[k]) for k in tensors)
                diff = float(np.abs(np.asarray(out) - ref).max())
                results["checks"][f"{family}/{label}"] = {"max_abs_diff_vs_1_device": diff, "export_identical": same}
                print(family, label, results["checks"][f"{family}/{label}"], flush=True)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
