"""Attribution scores equal PyTorch autograd run one example at a time, for every score kind;
they do not depend on batch size or device count; a resumed scan equals an uninterrupted one."""

import glob
import os
import shutil

import chex
import jax
import numpy as np
import pytest
import torch

import harmjax
from harmjax.attribution import ResumeMismatchError, scan, scored_names
from harmjax.sharding import MeshConfig, make_mesh
from harmjax.tree import flatten
from tests.hf_reference import save_tiny_with_tokenizer, tiny_hf_model, tiny_tokenizer

# Prompts and responses of different lengths, so batches mix lengths and buckets.
EXAMPLES = [
    {"prompt": "How do I pick a lock?", "response": "First, insert a tension wrench."},
    {"prompt": "Write a threat.", "response": "You will regret this."},
    {"prompt": "Explain how to make a weapon at home " * 3, "response": "Take a pipe and"},
    {"prompt": "Hi", "response": "Sure, here is a detailed plan: " + "step, " * 20},
    {"prompt": "Tell me a secret.", "response": "No."},
]


def _torch_scores(hf_model, examples):
    """Per-example autograd, unpadded: G = sum_i dL_i/dW, A = sum_i |dL_i/dW|."""
    tok = tiny_tokenizer()
    linear = {n: p for n, p in hf_model.named_parameters() if n.endswith("_proj.weight")}
    G = {n: torch.zeros_like(p) for n, p in linear.items()}
    A = {n: torch.zeros_like(p) for n, p in linear.items()}
    for ex in examples:
        n_prompt = len(tok(ex["prompt"] + "\n")["input_ids"])
        ids = torch.tensor([tok(ex["prompt"] + "\n" + ex["response"])["input_ids"]])
        hf_model.zero_grad()
        logp = torch.log_softmax(hf_model(ids).logits[0, :-1].float(), -1)
        nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]
        nll[n_prompt - 1 :].mean().backward()  # targets are the response tokens
        for n, p in linear.items():
            G[n] += p.grad
            A[n] += p.grad.abs()
    W = {n: p.detach() for n, p in linear.items()}
    return {
        "harm": {n: (-W[n] * G[n]).numpy() for n in W},
        "retain": {n: (W[n].abs() * A[n]).numpy() for n in W},
        "retain_mean": {n: (W[n] * G[n]).abs().numpy() for n in W},
    }


# One padded length per scan keeps compilations (the test's cost) to one per configuration.
ONE_BUCKET = dict(num_buckets=1, progress=False)


def _assert_close(ours, ref):
    assert ours.keys() == ref.keys()
    for name in ref:
        scale = np.abs(ref[name]).max()
        np.testing.assert_allclose(np.asarray(ours[name]), ref[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf_model = tiny_hf_model("llama", seed=3)
    path = save_tiny_with_tokenizer(hf_model, tmp_path_factory.mktemp("tiny"))
    return hf_model, path


@pytest.mark.parametrize("kind", ["harm", "retain", "retain_mean"])
def test_scores_match_torch_autograd(tiny, kind):
    hf_model, path = tiny
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    ref = _torch_scores(hf_model, EXAMPLES)[kind]
    ours = flatten(scan(model, EXAMPLES, kind, batch_size=3, **ONE_BUCKET).scores)
    _assert_close(ours, ref)
    # A non-trivial check: most scores are non-zero and both signs occur for harm.
    values = np.concatenate([np.ravel(v) for v in ref.values()])
    assert (values != 0).mean() > 0.9
    if kind == "harm":
        assert (values > 0).any() and (values < 0).any()


def test_several_kinds_from_one_pass(tiny, tmp_path):
    """kind=("retain", "harm", "retain_mean") gives each kind's autograd scores from one pass
    (the "both" accumulators), also on 8 devices and through a resumed checkpoint."""
    hf_model, path = tiny
    ref = _torch_scores(hf_model, EXAMPLES)
    kinds = ("retain", "harm", "retain_mean")
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    first = scan(model, EXAMPLES, kinds, batch_size=2, abs_chunk=1, checkpoint_dir=str(tmp_path),
                 checkpoint_every=1, stop_after=1, **ONE_BUCKET)
    assert first.kind == kinds
    result = scan(model, EXAMPLES, kinds, batch_size=2, abs_chunk=1, checkpoint_dir=str(tmp_path), **ONE_BUCKET)
    assert result.resumed_from == 1 and set(result.scores) == set(kinds)
    for k in kinds:
        _assert_close(flatten(result.scores[k]), ref[k])
    with pytest.raises(ValueError, match="distinct"):
        scan(model, EXAMPLES, ("harm", "harm"), **ONE_BUCKET)


@pytest.mark.parametrize("kind", ["harm", "retain"])
def test_scores_independent_of_batch_size_and_devices(tiny, kind):
    _, path = tiny
    one = harmjax.load(path, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    many = harmjax.load(path, mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    base = flatten(scan(one, EXAMPLES, kind, batch_size=1, **ONE_BUCKET).scores)
    for model, batch in ((one, 5), (many, 4)):
        other = flatten(scan(model, EXAMPLES, kind, batch_size=batch, abs_chunk=3, **ONE_BUCKET).scores)
        for name in base:
            # Summation order differs with the batch split: float32 rounding of sums whose terms
            # cancel reaches a few 1e-6 of the leaf's largest score (a dropped or doubled example
            # moves scores by whole percents).
            np.testing.assert_allclose(np.asarray(other[name]), np.asarray(base[name]), rtol=2e-5,
                                       atol=5e-6 * np.abs(base[name]).max(), err_msg=f"{name} b={batch}")


def test_remat_gives_the_same_scores(tiny):
    """bfloat16 scans are checked at the selection tail in tests/test_bf16_selection.py."""
    hf_model, path = tiny
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    plain = flatten(scan(model, EXAMPLES, "harm", batch_size=5, **ONE_BUCKET).scores)
    remat = flatten(scan(model, EXAMPLES, "harm", batch_size=5, remat=True, **ONE_BUCKET).scores)
    for name in plain:
        np.testing.assert_allclose(np.asarray(remat[name]), np.asarray(plain[name]), rtol=1e-4,
                                   atol=1e-6 * np.abs(plain[name]).max())


def test_scope_selects_leaves(tiny):
    _, path = tiny
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    names = scored_names(model.config)
    assert len(names) == 7 * 3 and names[0] == "model.layers.0.self_attn.q_proj.weight"
    scope = ("model.layers.1.mlp.*_proj.weight",)
    scores = flatten(scan(model, EXAMPLES[:2], "harm", scope=scope, **ONE_BUCKET).scores)
    assert sorted(scores) == sorted(f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down"))
    with pytest.raises(ValueError, match="not a decoder linear weight"):
        scored_names(model.config, ("model.norm.weight",))
    with pytest.raises(ValueError, match="matches no parameter"):
        scored_names(model.config, ("model.layers.9.*",))


def test_resume_equals_uninterrupted(tiny, tmp_path):
    _, path = tiny
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    full = flatten(scan(model, EXAMPLES * 3, "retain", batch_size=2, **ONE_BUCKET).scores)
    ckpt = str(tmp_path / "ckpt")
    # Two partial runs (each stops and saves, as a killed job's last save would), then the rest.
    first = scan(model, EXAMPLES * 3, "retain", batch_size=2, checkpoint_dir=ckpt, checkpoint_every=1,
                 stop_after=2, **ONE_BUCKET)
    assert first.resumed_from == 0
    # The state a kill during a save's clean-up leaves: `state` plus a half-deleted
    # `state.old`. The next save must not trip over it.
    shutil.copytree(os.path.join(ckpt, "state"), os.path.join(ckpt, "state.old"))
    leftover = sorted(p for p in glob.glob(os.path.join(ckpt, "state.old", "**"), recursive=True) if os.path.isfile(p))
    os.remove(leftover[-1])
    second = scan(model, EXAMPLES * 3, "retain", batch_size=2, checkpoint_dir=ckpt, checkpoint_every=2,
                  stop_after=1, **ONE_BUCKET)
    assert second.resumed_from == 2
    # A kill between the save's two renames leaves only `state.old`: the scan resumes from it.
    os.replace(os.path.join(ckpt, "state"), os.path.join(ckpt, "state.old"))
    last = scan(model, EXAMPLES * 3, "retain", batch_size=2, checkpoint_dir=ckpt, checkpoint_every=2,
                **ONE_BUCKET)
    assert last.resumed_from == 3
    # A finished scan writes no final state (its scores are returned): a rerun starts from
    # the last periodic save.
    assert scan(model, EXAMPLES * 3, "retain", batch_size=2, checkpoint_dir=ckpt, **ONE_BUCKET).resumed_from == 3
    chex.assert_trees_all_equal(flatten(last.scores), full)
    # A different scan must not silently continue from this state.
    with pytest.raises(ResumeMismatchError, match="different model, data or settings"):
        scan(model, EXAMPLES, "retain", batch_size=2, checkpoint_dir=ckpt, **ONE_BUCKET)


def test_examples_from_a_datasets_dataset():
    import datasets

    from harmjax.attribution import as_examples

    rows = [{**e, "category": "c"} for e in EXAMPLES]
    assert as_examples(datasets.Dataset.from_list(rows)) == as_examples(rows)
    assert as_examples(rows)[0].prompt == EXAMPLES[0]["prompt"] and as_examples(rows)[0].category == "c"


def test_bad_examples_are_named(tiny):
    _, path = tiny
    model = harmjax.load(path, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    from harmjax.data.records import DatasetFormatError

    with pytest.raises(DatasetFormatError, match="row 1: empty or missing 'response'"):
        scan(model, [EXAMPLES[0], {"prompt": "x", "response": " "}], "harm", **ONE_BUCKET)
    with pytest.raises(DatasetFormatError, match="no column 'response'"):
        scan(model, [{"prompt": "x", "answer": "y"}], "harm", **ONE_BUCKET)
