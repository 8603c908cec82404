"""How far a bf16-sized rounding difference moves harm scores, on trained and on random weights.

Two compilations of a scan (another batch size, mesh, remat, the fused kernel) round the bf16
forward and backward passes differently; on random Qwen2.5-14B weights that moved accumulators
by up to 21% of the largest entry (docs/design.md "Attribution: scores across compilations"). This measures whether
trained weights amplify such a difference as much. It scores the same examples twice per model,
once with the embedding table multiplied by (1 + 2^-9 * N(0, 1)) (one bf16 half-ulp of noise
at the residual stream's input, a stand-in for one differently rounded operation), and
reports, for the model's trained weights and for a random-init twin of the same shape:
the loss change, each matrix's largest accumulator change relative to its largest entry
(the GPU probes' measure), and the Jaccard overlap of the top-q harm sets selected from the
two score trees (what the science uses).

With --compare=bf16 it instead measures what loading the model in bfloat16 (the paper
configs' dtype) costs at the selection tail (issue 29): the harm scan of the same examples
with float32 params, with bfloat16 params (float32 accumulators, as the library always
does), with float32 params rounded to bfloat16 (weight rounding alone, float32 compute) and
with float32 params times (1 + 2^-8 U(-1, 1)) (a random perturbation of bf16's relative
size, the reference noise floor), plus retain scans of benign examples in each setting, and
reports per q the overlap of the per-matrix top-q harm sets and of the masks T_q \ T_p with
the float32 ones (Jaccard, and the share of the float32 set recovered). docs/bf16_selection.md
has the numbers.

  PYTHONPATH=. python benchmarks/rounding_sensitivity.py              # the embedded model, CPU
  PYTHONPATH=. python benchmarks/rounding_sensitivity.py --compare=bf16 --q=1e-5,2e-5,4e-5,1e-4
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
_COMPARE = flags.DEFINE_enum("compare", "perturb", ["perturb", "bf16"],
                             "perturb: half a bf16 ulp on the embeddings; bf16: float32 vs bfloat16 params.")
_P = flags.DEFINE_float("p", 5e-5, "Retain fraction T_p subtracted from T_q (--compare=bf16).")


def _overlap(ref, other) -> dict:
    """Jaccard and recall (share of `ref`'s selected weights also in `other`) of two bool trees."""
    from harmjax.tree import flatten

    a, b = flatten(ref), flatten(other)
    both = sum(int(np.logical_and(np.asarray(a[n]), np.asarray(b[n])).sum()) for n in a)
    n_ref = sum(int(np.asarray(a[n]).sum()) for n in a)
    n_other = sum(int(np.asarray(b[n]).sum()) for n in a)
    union = n_ref + n_other - both
    return {"jaccard": 1.0 if union == 0 else both / union, "recall": 1.0 if n_ref == 0 else both / n_ref,
            "selected": n_ref}


def bf16_selection(path: str, examples, benign) -> list[dict]:
    """Rows comparing the float32 scan's top-q sets and masks with bf16 and perturbed scans."""
    import jax
    import jax.numpy as jnp

    import harmjax
    from harmjax.tree import flatten, unflatten

    f32 = harmjax.load(path, dtype="float32")
    b16 = harmjax.load(path, dtype="bfloat16")
    flat = flatten(f32.params)
    keys = jax.random.split(jax.random.key(2), len(flat))
    # Uniform relative noise of at most 2^-8: bf16's unit roundoff, the size of the error
    # that rounding a float32 weight to bf16 makes (scored and unscored leaves alike).
    noisy = {n: w * (1 + 2.0**-8 * jax.random.uniform(k, w.shape, jnp.float32, -1.0, 1.0))
             for (n, w), k in zip(flat.items(), keys)}
    variants = {  # name -> (model whose config/tokenizer/compiled step is used, params)
        "float32": (f32, f32.params),
        "bfloat16": (b16, b16.params),
        "float32_on_bf16_rounded_weights": (f32, jax.tree.map(
            lambda w: w.astype(jnp.bfloat16).astype(jnp.float32), f32.params)),
        "float32_2^-8_noise": (f32, unflatten(noisy)),
    }
    settings = dict(batch_size=_BATCH.value, max_length=_MAX_LENGTH.value, progress=False)
    scans = {}
    for name, (model, params) in variants.items():
        harm = harmjax.scan(model, examples, "harm", params=params, **settings)
        retain = harmjax.scan(model, benign, "retain", params=params, **settings)
        scans[name] = (harm, retain)
        print(f"{name}: harm loss {harm.mean_loss:.5f} ({harm.seconds:.0f} s), "
              f"retain loss {retain.mean_loss:.5f} ({retain.seconds:.0f} s)", flush=True)
    ref_harm, ref_retain = scans["float32"]
    rows = []
    for name, (harm, retain) in scans.items():
        if name == "float32":
            continue
        a, b = flatten(ref_harm.scores), flatten(harm.scores)
        rel = [float(np.abs(np.asarray(a[n]) - np.asarray(b[n])).max() / max(np.abs(np.asarray(a[n])).max(), 1e-30))
               for n in a]
        row = {"compare": "bf16", "variant": name, "model": _MODEL.value or "embedded SmolLM2-135M-Instruct",
               "examples": len(examples), "benign_examples": len(benign), "max_length": _MAX_LENGTH.value,
               "device": jax.devices()[0].device_kind, "granularity": "matrix", "p": _P.value,
               "harm_loss": [ref_harm.mean_loss, harm.mean_loss],
               "harm_score_rel_change": {"median_matrix": float(np.median(rel)), "max_matrix": float(max(rel))},
               "top_q": {}, "mask": {}}
        for q in _QS.value:
            q = float(q)
            top = [harmjax.select(h.scores, None, q=q, progress=False) for h in (ref_harm, harm)]
            masks = [harmjax.select(h.scores, r.scores, q=q, p=_P.value, progress=False)
                     for h, r in ((ref_harm, ref_retain), (harm, retain))]
            row["top_q"][str(q)] = _overlap(*top)
            row["mask"][str(q)] = _overlap(*masks)
        rows.append(row)
    return rows


def main(argv):
    del argv
    if _COMPARE.value == "bf16":
        from harmjax.assets import default_model_dir
        from harmjax.data.benign_set import load_benign_instructions
        from harmjax.data.loaders import load_strongreject

        prompts = [e.prompt for e in load_strongreject()][: _N.value + 1]
        examples = [{"prompt": p, "response": r} for p, r in zip(prompts, prompts[1:])]
        # Benign instructions answered by the next instruction: a stand-in retain set (the
        # experiment's has the model's own answers), enough to give T_p real scores.
        instructions = [e.prompt for e in load_benign_instructions()][: _N.value + 1]
        benign = [{"prompt": p, "response": r} for p, r in zip(instructions, instructions[1:])]
        for row in bf16_selection(_MODEL.value or default_model_dir(), examples, benign):
            _emit(row)
        return
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
        _emit(row)


def _emit(row: dict) -> None:
    print(json.dumps(row), flush=True)
    if _OUT.value:
        with open(_OUT.value, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    app.run(main)
