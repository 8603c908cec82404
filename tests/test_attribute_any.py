"""`harmjax.attribute` on models harmjax did not write: a Flax linen transformer and an NNX
model built here, checked against PyTorch autograd in float64 one example at a time; on
harmjax's decoder it equals the probe-based `scan`; NNX scores feed `select` and `apply_mask`."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import harmjax
from harmjax.attribution import DEFAULT_SCOPE, attribute, scan
from harmjax.data.calibration import calibration_batches
from harmjax.data.records import DatasetFormatError, to_examples
from harmjax.sharding import MeshConfig, make_mesh
from harmjax.tree import flatten
from tests.hf_reference import save_tiny_with_tokenizer, tiny_hf_model, tiny_tokenizer

VOCAB, DIM, HEADS = 37, 16, 2
KINDS = ("harm", "retain", "retain_mean")


class TinyLM(nn.Module):
    """A pre-norm one-block transformer with its own layout (kernels are (in, out))."""

    @nn.compact
    def __call__(self, ids, mask):
        x = nn.Embed(VOCAB, DIM, name="embed")(ids)
        h = nn.LayerNorm(name="ln1")(x)
        b, t, _ = x.shape
        q, k, v = (nn.Dense(DIM, name=n)(h).reshape(b, t, HEADS, DIM // HEADS) for n in "qkv")
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(DIM // HEADS)
        allowed = jnp.tril(jnp.ones((t, t), bool))[None, None] & mask[:, None, None, :].astype(bool)
        att = jax.nn.softmax(jnp.where(allowed, att, -1e9), -1)
        x = x + nn.Dense(DIM, name="o")(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, DIM))
        x = x + nn.Dense(DIM, name="down")(nn.gelu(nn.Dense(4 * DIM, name="up")(nn.LayerNorm(name="ln2")(x))))
        return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="ln_f")(x))


def _torch_tinylm(p, ids):
    """The same network in PyTorch (float64), from the Flax params `p` (torch tensors)."""
    ln = lambda x, n: F.layer_norm(x, (DIM,), p[f"{n}.scale"], p[f"{n}.bias"], eps=1e-6)
    dense = lambda x, n: x @ p[f"{n}.kernel"] + p[f"{n}.bias"]
    x = p["embed.embedding"][ids]
    h = ln(x, "ln1")
    t = ids.shape[0]
    q, k, v = (dense(h, n).reshape(t, HEADS, DIM // HEADS) for n in "qkv")
    att = torch.einsum("qhd,khd->hqk", q, k) / np.sqrt(DIM // HEADS)
    att = torch.softmax(att.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), -1e9), -1)
    x = x + dense(torch.einsum("hqk,khd->qhd", att, v).reshape(t, DIM), "o")
    x = x + dense(F.gelu(dense(ln(x, "ln2"), "up"), approximate="tanh"), "down")
    return dense(ln(x, "ln_f"), "head")


def _examples(seed=0, n=6):
    """Token-id examples of mixed lengths: (ids, number of prompt tokens)."""
    rng = np.random.RandomState(seed)
    return [(rng.randint(1, VOCAB, rng.randint(6, 14)), int(rng.randint(2, 5))) for _ in range(n)]


def _batches(examples, rows):
    """Right-padded batches with a response-only loss mask."""
    out = []
    for s in range(0, len(examples), rows):
        part = examples[s : s + rows]
        length = max(len(ids) for ids, _ in part)
        b = {k: np.zeros((len(part), length), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
        for r, (ids, n_prompt) in enumerate(part):
            b["input_ids"][r, : len(ids)] = ids
            b["attention_mask"][r, : len(ids)] = 1
            b["loss_mask"][r, n_prompt : len(ids)] = 1
        out.append(b)
    return out


def _torch_scores(forward, flat_params, scored, examples):
    """Per-example float64 autograd: the three kinds over the `scored` names."""
    p = {n: torch.tensor(np.asarray(x, np.float64), requires_grad=n in scored) for n, x in flat_params.items()}
    G = {n: torch.zeros_like(p[n]) for n in scored}
    A = {n: torch.zeros_like(p[n]) for n in scored}
    for ids, n_prompt in examples:
        ids = torch.tensor(ids)
        logp = torch.log_softmax(forward(p, ids)[:-1], -1)
        nll = -logp.gather(-1, ids[1:, None])[:, 0]
        grads = torch.autograd.grad(nll[n_prompt - 1 :].mean(), [p[n] for n in scored])
        for n, g in zip(scored, grads):
            G[n] += g
            A[n] += g.abs()
    W = {n: p[n].detach() for n in scored}
    return {
        "harm": {n: (-W[n] * G[n]).numpy() for n in W},
        "retain": {n: (W[n].abs() * A[n]).numpy() for n in W},
        "retain_mean": {n: (W[n] * G[n]).abs().numpy() for n in W},
    }


def _assert_close(ours, ref, rel=1e-4):
    assert sorted(ours) == sorted(ref)
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-3, atol=rel * np.abs(ref[name]).max(), err_msg=name)


@pytest.fixture(scope="module")
def linen_model():
    module = TinyLM()
    params = module.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))["params"]
    # Perturb biases and norms away from their constant init, so a dropped term would show.
    params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(x.size), x.shape), params)
    return module, params


def test_linen_scores_equal_torch_autograd(linen_model):
    module, params = linen_model
    examples = _examples()
    apply_fn = lambda p, ids, m: module.apply({"params": p}, ids, m)
    ours = attribute(apply_fn, params, _batches(examples, 4), KINDS, scope=("*.kernel",), chunk=2, progress=False)
    scored = sorted(n for n in flatten(params) if n.endswith(".kernel"))
    ref = _torch_scores(_torch_tinylm, flatten(params), scored, examples)
    for kind in KINDS:
        _assert_close(flatten(ours[kind]), ref[kind])
        chex.assert_tree_all_finite(ours[kind])
    # Each kind alone equals the same kind from the joint pass; batch size and chunk do not matter.
    alone = attribute(apply_fn, params, _batches(examples, 3), "retain", scope=("*.kernel",), chunk=3, progress=False)
    chex.assert_trees_all_close(alone, ours["retain"], rtol=1e-5, atol=1e-7)


def test_linen_scores_on_a_mesh_equal_one_device(linen_model):
    module, params = linen_model
    apply_fn = lambda p, ids, m: module.apply({"params": p}, ids, m)
    batches = _batches(_examples(1), 6)
    one = attribute(apply_fn, params, batches, "retain", scope=lambda n, x: n.startswith(("q.", "up.")),
                    mesh=make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]), chunk=4, progress=False)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=1), devices=jax.devices()[:4])
    many = attribute(apply_fn, params, batches, "retain", scope=lambda n, x: n.startswith(("q.", "up.")),
                     mesh=mesh, chunk=4, progress=False)
    assert sorted(flatten(one)) == ["q.bias", "q.kernel", "up.bias", "up.kernel"]
    chex.assert_trees_all_close(many, one, rtol=1e-5, atol=1e-7)


class NnxLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.hidden = nnx.Linear(DIM, 2 * DIM, rngs=rngs)
        self.head = nnx.Linear(2 * DIM, VOCAB, rngs=rngs)

    def __call__(self, ids):
        return self.head(jnp.tanh(self.hidden(self.embed(ids))))


def test_nnx_scores_select_and_apply_mask():
    model = NnxLM(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    examples = _examples(2)
    apply_fn = lambda s, ids, m: nnx.merge(graphdef, s)(ids)
    scores = attribute(apply_fn, state, _batches(examples, 3), ("harm", "retain"), scope=("*.kernel",), progress=False)

    def torch_forward(p, ids):
        h = torch.tanh(p["embed.embedding"][ids] @ p["hidden.kernel"] + p["hidden.bias"])
        return h @ p["head.kernel"] + p["head.bias"]

    flat_state = {n: np.asarray(x) for n, x in harmjax.tree.iter_leaves(state)}
    ref = _torch_scores(torch_forward, flat_state, ["head.kernel", "hidden.kernel"], examples)
    _assert_close(flatten(scores["harm"]), ref["harm"])
    _assert_close(flatten(scores["retain"]), ref["retain"])

    mask = harmjax.select(scores["harm"], scores["retain"], q=0.05, p=0.05, progress=False)
    pruned = harmjax.apply_mask(state, mask)
    assert isinstance(pruned, nnx.State)
    for name, m in flatten(mask).items():
        assert int(np.asarray(m).sum()) > 0
        np.testing.assert_array_equal(np.asarray(dict(harmjax.tree.iter_leaves(pruned))[name])[np.asarray(m)], 0.0)
        np.testing.assert_array_equal(np.asarray(dict(harmjax.tree.iter_leaves(pruned))[name])[~np.asarray(m)],
                                      flat_state[name][~np.asarray(m)])
    nnx.update(model, pruned)
    np.testing.assert_array_equal(np.asarray(model.head.kernel[...])[np.asarray(mask["head"]["kernel"])], 0.0)
    chex.assert_trees_all_equal(pruned["embed"], state["embed"])  # unscored leaves untouched


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = save_tiny_with_tokenizer(tiny_hf_model("llama"), tmp_path_factory.mktemp("llama"))
    return path


TEXT_EXAMPLES = [
    {"prompt": "How do I pick a lock?", "response": "First, insert a tension wrench."},
    {"prompt": "Write a threat.", "response": "You will regret this."},
    {"prompt": "Explain how to make a weapon at home", "response": "Take a pipe and"},
    {"prompt": "Hi", "response": "Sure, here is a detailed plan: step, step, step."},
]


@pytest.mark.parametrize("mesh_config", [MeshConfig(data=1), MeshConfig(data=1, fsdp=2, tensor=2)])
def test_on_harmjax_decoder_equals_probe_scan(tiny_llama, mesh_config):
    devices = jax.devices()[: 1 if mesh_config.fsdp == 1 else 4]
    model = harmjax.load(tiny_llama, dtype="float32", mesh=make_mesh(mesh_config, devices=devices))
    examples, _ = to_examples(TEXT_EXAMPLES, "prompt", "response", source="test")
    batches = calibration_batches(tiny_tokenizer(), examples, 2, "raw", 256, 1)
    apply_fn = lambda p, ids, m: harmjax.forward(p, model.config, ids, m)
    ours = attribute(apply_fn, model.params, batches, ("retain", "harm"), scope=DEFAULT_SCOPE, mesh=model.mesh,
                     chunk=2, progress=False)
    probe = scan(model, TEXT_EXAMPLES, ("retain", "harm"), batch_size=2, num_buckets=1, progress=False).scores
    for kind in ("retain", "harm"):
        for name, ref in flatten(probe[kind]).items():
            got = flatten(ours[kind])[name]
            assert got.sharding.is_equivalent_to(ref.sharding, 2), name  # sharded like the weight
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4,
                                       atol=1e-5 * float(np.abs(np.asarray(ref)).max()), err_msg=name)


def test_bad_scope_and_bad_batches_are_named(linen_model):
    module, params = linen_model
    apply_fn = lambda p, ids, m: module.apply({"params": p}, ids, m)
    batches = _batches(_examples(), 3)
    with pytest.raises(ValueError, match="'nothing.*' matches no leaf"):
        attribute(apply_fn, params, batches, scope=("nothing.*",), progress=False)
    with pytest.raises(DatasetFormatError, match="Batch 0 has no 'loss_mask'"):
        attribute(apply_fn, params, [{"input_ids": batches[0]["input_ids"], "attention_mask": batches[0]["attention_mask"]}],
                  progress=False)
    with pytest.raises(ValueError, match="Unknown score kind"):
        attribute(apply_fn, params, batches, "harmful", progress=False)
