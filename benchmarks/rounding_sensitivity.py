"""How far a bf16-sized rounding difference moves harm scores, on trained and on random weights.

Two compilations of a scan (another batch size, mesh, remat, the fused kernel) round the bf16
forward and backward passes differently; on random Qwen2.5-14B weights that moved accumulators
by up to 21% of the largest entry (BUILD_NOTES "Throughput at scale"). This measures whether
trained weights amplify such a difference as much. It scores the same examples twice per model,
once with the embedding table multiplied by (1 + 2^-9 * N(0, 1)) (one bf16 half-ulp of noise
at the residual stream's input, a stand-in for one differently rounded operation), and
reports, for the model's trained weights and for a random-init twin of the same shape:
the loss change, each matrix's largest accumulator change relative to its largest entry
(the GPU probes' measure), and the Jaccard overlap of the top-q harm sets selected from the
two score trees (what the science uses).

  PYTHONPATH=. python benchmarks/rounding_sensitivity.py              # the embedded model, CPU
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags

_MODEL = flags.DEFINE_string("model", "", "Checkpoint (default: the embedded SmolLM2-135M-Instruct).")
_N = flags.DEFINE_integer("n", 16, "Examples (StrongREJECT prompts; each one's response is the next prompt).")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 128, "Tokens per example.")
_BATCH = flags.DEFINE_integer("batch", 8, "Examples per scan batch.")
_QS = flags.DEFINE_list("q", ["1e-4", "1e-3", "1e-2"], "Top fractions whose selected sets are compared.")
_OUT = flags.DEFINE_string("out", "", "Also write the rows here (JSON lines).")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    import harmjax
    from harmjax.assets import default_model_dir
    from harmjax.data.loaders import load_strongreject
    from harmjax.model.init import init_params
    from harmjax.tree import flatten, unflatten

    model = harmjax.load(_MODEL.value or default_model_dir())
    prompts = [e.prompt for e in load_strongreject()][: _N.value + 1]
    examples = [{"prompt": p, "response": r} for p, r in zip(prompts, prompts[1:])]
    dtype = jax.tree.leaves(model.params)[0].dtype
    twins = {"trained": model.params,
             "random": init_params(model.config, jax.random.key(0), model.mesh, dtype)}
    embed_name = "model.embed_tokens.weight"
    for label, params in twins.items():
        flat = flatten(params)
        table = flat[embed_name]
        noise = jax.random.normal(jax.random.key(1), table.shape, jnp.float32)
        perturbed = dict(flat, **{embed_name: (table.astype(jnp.float32) * (1 + 2.0**-9 * noise)).astype(table.dtype)})
        results = [harmjax.scan(model, examples, "harm", params=unflatten(tree), batch_size=_BATCH.value,
                                max_length=_MAX_LENGTH.value, progress=False)
                   for tree in (params, perturbed)]
        a, b = (flatten(r.scores) for r in results)
        rel = {n: float(np.abs(np.asarray(a[n]) - np.asarray(b[n])).max() / max(np.abs(np.asarray(a[n])).max(), 1e-30))
               for n in a}
        names = sorted(rel, key=rel.get)
        row = {
            "weights": label, "model": _MODEL.value or "embedded SmolLM2-135M-Instruct", "dtype": str(dtype),
            "examples": len(examples), "device": jax.devices()[0].device_kind,
            "mean_loss": [r.mean_loss for r in results],
            "loss_rel_change": abs(results[1].mean_loss - results[0].mean_loss) / abs(results[0].mean_loss),
            "score_rel_change": {"median_matrix": float(np.median(list(rel.values()))), "max_matrix": rel[names[-1]],
                                 "worst": names[-1], "first_layer_q": rel.get("model.layers.0.self_attn.q_proj.weight"),
                                 "last_layer_down": rel.get(
                                     f"model.layers.{model.config.num_layers - 1}.mlp.down_proj.weight")},
            "top_q_jaccard": {q: harmjax.jaccard(harmjax.select(results[0].scores, None, q=float(q), progress=False),
                                                 harmjax.select(results[1].scores, None, q=float(q), progress=False))
                              for q in _QS.value},
        }
        print(json.dumps(row), flush=True)
        if _OUT.value:
            with open(_OUT.value, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    app.run(main)
