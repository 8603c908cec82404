"""bfloat16 harm scans keep the float32 scans' selection tail (issue 29).

The experiment prunes the top q = 1e-5..1e-4 of each matrix by harm score, so what matters
about a bf16 run is whether it selects the same few weights, not whether all scores
correlate. On a tiny random model (built here with transformers) this checks, per matrix as
the experiment selects:
  * the bf16 scan's top-q sets overlap the float32 scan's at least as well as a rounding-sized
    perturbation of the float32 weights does, minus a margin;
  * against an independent reference of the same quantity, PyTorch autograd on the model cast
    to bf16 with the gradient products summed in float32, the bf16 scan agrees better than
    with float32, and its tail scores are within a bf16-sized error.
The real model's numbers are in docs/bf16_selection.md (benchmarks/rounding_sensitivity.py).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import harmjax
from harmjax.attribution import scan
from harmjax.sharding import MeshConfig, make_mesh
from harmjax.tree import flatten, unflatten
from tests.hf_reference import save_tiny_with_tokenizer, tiny_hf_model, tiny_tokenizer

# The tiny model's matrices hold 2,048-6,144 weights (92k in all), so the experiment's
# q = 1e-5..1e-4 would select no weight. Scaling q and p by 100 keeps the experiment's p/q
# ratios and selects 90 (q=1e-3: 2-6 per matrix, like the 135M model's 1-9 at 1e-5) to 909
# weights (q=1e-2: 20-61 per matrix, like an 8B model's 1e-5 of a 4096x4096 matrix).
QS = (1e-3, 2e-3, 4e-3, 1e-2)

# bf16's unit roundoff: the relative error of rounding a float32 weight to bf16.
U = 2.0**-8

_RNG = np.random.RandomState(0)
_WORDS = ("the a how to make build explain write plan step first then weapon lock code secret "
          "tell me you will now here is sure").split()
# 48 examples scanned one per batch: 48 additions per accumulator, so an accumulator kept in
# bf16 (a broken path this test must catch) rounds 48 times and drifts by several U.
EXAMPLES = [{"prompt": " ".join(_RNG.choice(_WORDS, _RNG.randint(3, 12))),
             "response": " ".join(_RNG.choice(_WORDS, _RNG.randint(4, 16)))} for _ in range(48)]
SCAN = dict(batch_size=1, num_buckets=1, progress=False)


def _torch_bf16_harm(hf_model, examples) -> dict[str, np.ndarray]:
    """-W * sum_i dL_i/dW of the model cast to bf16, the products g^T x of each linear map's bf16
    input x and bf16 output gradient g formed and summed in float32 (hooks, one example at a
    time, unpadded): the quantity the library computes, from PyTorch's autograd."""
    tok = tiny_tokenizer()
    model = hf_model.to(torch.bfloat16)
    linear = {n: m for n, m in model.named_modules() if n.endswith("_proj")}
    sums = {n: torch.zeros(m.weight.shape, dtype=torch.float32) for n, m in linear.items()}
    seen = {}

    def hook(name):
        def forward_hook(module, inputs, output):
            x = inputs[0].detach()
            output.register_hook(lambda g: seen.__setitem__(name, (x, g.detach())))
        return forward_hook

    handles = [m.register_forward_hook(hook(n)) for n, m in linear.items()]
    try:
        for ex in examples:
            n_prompt = len(tok(ex["prompt"] + "\n")["input_ids"])
            ids = torch.tensor([tok(ex["prompt"] + "\n" + ex["response"])["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]
            nll[n_prompt - 1:].mean().backward()
            for n in linear:
                x, g = seen[n]
                sums[n] += torch.einsum("bto,bti->oi", g.float(), x.float())
    finally:
        for h in handles:
            h.remove()
        hf_model.float()
    return {f"{n}.weight": (-m.weight.detach().float() * sums[n]).numpy() for n, m in linear.items()}


def _top(scores: dict, q: float) -> dict[str, set]:
    """Per matrix, the flat indices of the floor(q * size) largest scores (stable: lowest index
    first among ties), in NumPy, independent of harmjax.select."""
    out = {}
    for name, s in scores.items():
        flat = np.ravel(np.asarray(s, np.float32))
        out[name] = set(np.argsort(-flat, kind="stable")[: math.floor(q * flat.size)].tolist())
    return out


def _jaccard(a: dict, b: dict) -> float:
    both = sum(len(a[n] & b[n]) for n in a)
    either = sum(len(a[n] | b[n]) for n in a)
    return both / either


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    hf_model = tiny_hf_model("llama", seed=0)
    path = save_tiny_with_tokenizer(hf_model, tmp_path_factory.mktemp("tiny"))
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    f32 = harmjax.load(path, dtype="float32", mesh=mesh)
    b16 = harmjax.load(path, dtype="bfloat16", mesh=mesh)
    flat = flatten(f32.params)
    keys = jax.random.split(jax.random.key(1), len(flat))
    # Every float32 weight times (1 + U * uniform(-1, 1)): a random error of the size bf16
    # rounding makes, whose effect on the selection is the noise floor the bf16 run is held to.
    noisy = unflatten({n: w * (1 + U * jax.random.uniform(k, w.shape, jnp.float32, -1.0, 1.0))
                       for (n, w), k in zip(flat.items(), keys)})
    return {
        "float32": flatten(scan(f32, EXAMPLES, "harm", **SCAN).scores),
        "perturbed": flatten(scan(f32, EXAMPLES, "harm", params=noisy, **SCAN).scores),
        "bfloat16": flatten(scan(b16, EXAMPLES, "harm", **SCAN).scores),
        "torch_bf16": _torch_bf16_harm(hf_model, EXAMPLES),
    }


def test_bf16_top_q_sets_match_float32(scores):
    assert all(np.asarray(s).dtype == np.float32 for s in scores["bfloat16"].values())
    for q in QS:
        ref, low, noise = (_top(scores[k], q) for k in ("float32", "bfloat16", "perturbed"))
        assert sum(map(len, ref.values())) >= 90
        # The floor: the rounding-sized perturbation's own overlap, measured here (0.98-1.0 over
        # q on seed 0; bf16 itself gave 0.96-1.0), less 0.04 (two swapped weights out of the
        # 90 at q=1e-3), and never below 0.93. Set overlaps at this size cannot see a bf16
        # accumulator (a temporary mutation kept overlaps within 0.01 of the correct path's);
        # the reference test below catches that.
        floor = max(_jaccard(ref, noise) - 0.04, 0.93)
        assert _jaccard(ref, low) >= floor, (q, _jaccard(ref, low), floor)


def test_bf16_scan_matches_torch_bf16_reference(scores):
    ours, ref, f32 = scores["bfloat16"], scores["torch_bf16"], scores["float32"]
    assert ours.keys() == ref.keys()
    for q in QS:
        with_torch = _jaccard(_top(ref, q), _top(ours, q))
        assert with_torch >= _jaccard(_top(f32, q), _top(ours, q)), q
    # Tail scores: for the top 1% of each matrix by the reference, max |ours - ref| relative to
    # the k-th largest reference score. Two bf16 passes that round differently (XLA's fusions
    # vs PyTorch's eager ops) differ by a few U: measured (seed 0) a median over matrices of
    # 3.0 U and a worst matrix of 6.0 U. Accumulating the example sum in bf16 instead (a
    # temporary mutation of harmjax.attribution.probes) gave 8.6 U and 15 U (and failed the
    # overlap check above: 0.957 with torch vs 0.978 with float32 at q=2e-3). Bounds: 6 U, 10 U.
    errors = []
    for n, r in ref.items():
        r = np.ravel(r)
        kth = np.sort(r)[-(r.size // 100)]
        top = r >= kth
        errors.append(np.abs(np.ravel(np.asarray(ours[n]))[top] - r[top]).max() / kth)
    assert np.median(errors) <= 6 * U, np.median(errors) / U
    assert max(errors) <= 10 * U, max(errors) / U
