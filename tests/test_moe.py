"""Mixture-of-experts families (Mixtral, Qwen3-MoE, gpt-oss) against transformers/PyTorch on
tiny random models: logits with left padding on every compute path (ragged grouped matmuls,
gather, the dense all-experts reference), greedy KV-cache generation, the HF export round
trip, per-expert signed SNIP and per-example |grad| against autograd, MXFP4 dequantization
against transformers' own, and the bad-input errors."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import harmjax
import harmjax.generate
from harmjax.generate import sampler
from harmjax.attribution import scan, scored_names
from harmjax.errors import UnsupportedArchitectureError
from harmjax.io import mxfp4
from harmjax.io.safetensors_io import TensorReader, write_tensors
from harmjax.masks.apply import MaskMismatchError, check_mask_fits
from harmjax.model.moe_specs import ffn_key
from harmjax.model.decoder import forward
from harmjax.sharding import MeshConfig, make_mesh
from harmjax.tree import flatten, unflatten
from tests.hf_reference import VOCAB, hf_greedy, left_padded_batch, save_tiny, save_tiny_with_tokenizer, torch_logits
from tests.moe_reference import MOE_FAMILIES, tiny_moe_model
from tests.test_attribution import EXAMPLES, _assert_close

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py
FAMILIES = sorted(MOE_FAMILIES)


def _mesh():
    return make_mesh(MeshConfig(data=1), jax.devices()[:1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (transformers model, harmjax model)."""
    out = {}
    for family in FAMILIES:
        hf = tiny_moe_model(family)
        directory = save_tiny_with_tokenizer(hf, tmp_path_factory.mktemp(family))
        out[family] = (hf, harmjax.load(directory, dtype="float32", mesh=_mesh()))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_on_every_path(tiny, family):
    hf, model = tiny[family]
    ids, mask, positions = left_padded_batch(seed=2)
    ref = torch_logits(hf, ids, mask, positions)
    real = mask.astype(bool)
    fwd = jax.jit(forward, static_argnums=1)
    # Every family on the grouped-matmul path; gpt-oss (biases, clamp) on all three paths.
    for impl in ("ragged", "gather", "dense") if family == "gpt_oss" else ("ragged",):
        config = dataclasses.replace(model.config, moe_impl=impl)
        ours = np.asarray(fwd(model.params, config, jnp.asarray(ids), jnp.asarray(mask)))
        np.testing.assert_allclose(ours[real], ref[real], atol=2e-5, err_msg=f"{family} {impl}")
    # The fixture routes tokens to every expert of every MoE layer (no expert left untested).
    assert model.config.num_experts_per_tok == 2 and model.config.num_experts >= 4


@pytest.mark.parametrize("family,derive", [("qwen3_moe", "auto"), ("qwen3_moe", True), ("mixtral", True),
                                           ("gpt_oss", "auto")])
def test_greedy_generation_matches_transformers(family, derive, tmp_path, monkeypatch):
    """KV-cache greedy decoding (prefill on the ragged path, decode steps of 4 rows x top-2 on
    the gather path for qwen3_moe's 8 experts, ragged for the 4 of mixtral and gpt-oss) equals
    transformers, on the per-expert tree (the CPU's "auto": no memory statistics) and on the
    derived tree whose experts are stacked once per call, which the decode program receives."""
    hf = tiny_moe_model(family, initializer_range=0.3)
    model = harmjax.load(save_tiny(hf, tmp_path), dtype="float32", mesh=_mesh())
    rng = np.random.RandomState(1)
    inputs = [rng.randint(3, VOCAB, n).tolist() for n in (11, 3, 7)]
    ref = hf_greedy(hf, inputs, 10, eos=None, pad=0, every_step=True)
    assert all(len(set(row.tolist())) >= 3 for row in ref), ref
    received = []
    real_decode = sampler.jit_decode

    def recording_decode(*args, **kwargs):  # the real program, its params argument recorded
        program = real_decode(*args, **kwargs)
        return lambda params, *rest: (received.append(params), program(params, *rest))[1]

    monkeypatch.setattr(sampler, "jit_decode", recording_decode)
    out = harmjax.generate.generate_ids(model.params, model.config, model.mesh, inputs, max_new_tokens=10,
                                        pad_id=0, eos_ids=(), batch_size=4, progress=False,
                                        fuse_projections=derive)
    np.testing.assert_array_equal(np.stack([np.asarray(t) for t in out.tokens]), ref)
    assert out.stats["stacked_experts"] == (derive is True and family != "gpt_oss")
    c = model.config
    experts = [layer[ffn_key(c)]["experts"] for layer in received[0]["model"]["layers"].values()
               if "experts" in layer[ffn_key(c)]]
    assert len(experts) == sum(c.moe_layers)
    if not out.stats["stacked_experts"]:
        assert all("stacked" not in e for e in experts)
        return
    d, m, e = c.hidden_size, c.moe_intermediate_size, c.num_experts
    for block in experts:  # one (E, in, out) array per matrix kind, no per-expert leaves left
        assert set(block) == {"stacked"}
        assert {k: v.shape for k, v in block["stacked"].items()} == {"gate": (e, d, m), "up": (e, d, m),
                                                                      "down": (e, m, d)}


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_export_round_trip_loads_in_transformers(tiny, family, tmp_path):
    hf, model = tiny[family]
    out = harmjax.save_hf(model, str(tmp_path / "export"))
    with TensorReader(out) as reader, TensorReader(model.source_dir) as source:
        names = {n: reader.shape(n) for n in reader.names()}
        assert names == {n: source.shape(n) for n in source.names()}  # the file's own names and shapes
    sample = {"mixtral": "model.layers.1.block_sparse_moe.experts.3.w2.weight",
              "gpt_oss": "model.layers.1.mlp.experts.gate_up_proj"}[family]
    assert sample in names
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask, positions = left_padded_batch(seed=3)
    real = mask.astype(bool)  # padding rows differ between eager and sdpa attention
    np.testing.assert_allclose(torch_logits(back, ids, mask, positions)[real],
                               torch_logits(hf, ids, mask, positions)[real], atol=1e-5)


def _torch_expert_grads(hf, family, examples):
    """Per-example autograd, unpadded, mapped to the checkpoint's names: (W, G, A) per name."""
    from tests.hf_reference import tiny_tokenizer

    tok = tiny_tokenizer()
    params = dict(hf.named_parameters())
    G = {n: torch.zeros_like(p) for n, p in params.items()}
    A = {n: torch.zeros_like(p) for n, p in params.items()}
    for ex in examples:
        n_prompt = len(tok(ex["prompt"] + "\n")["input_ids"])
        ids = torch.tensor([tok(ex["prompt"] + "\n" + ex["response"])["input_ids"]])
        hf.zero_grad()
        logp = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1)
        nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]
        nll[n_prompt - 1:].mean().backward()
        for n, p in params.items():
            if p.grad is not None:
                G[n] += p.grad
                A[n] += p.grad.abs()
    out = {}
    for n, p in params.items():
        for name, sl in _file_names(hf.config, family, n, tuple(p.shape)):
            out[name] = (p.detach()[sl].numpy(), G[n][sl].numpy(), A[n][sl].numpy())
    return out


def _file_names(config, family, name, shape):
    """(file name, index into the torch parameter) pairs: transformers 5 fuses per-expert
    files into 3-D `gate_up_proj` (E, 2*inter, hidden: gate rows, then up) and `down_proj`."""
    if family == "gpt_oss" or ".experts." not in name:
        if family == "mixtral":
            name = name.replace(".mlp.", ".block_sparse_moe.")
        return [(name, slice(None))]
    pre = name.rsplit(".experts.", 1)[0] + ".experts"
    if family == "mixtral":
        pre = pre.replace(".mlp.", ".block_sparse_moe.")
    gate, up, down = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    half = shape[1] // 2
    if name.endswith("gate_up_proj"):
        return [(f"{pre}.{e}.{part}.weight", (e, slice(a, b)))
                for e in range(shape[0]) for part, a, b in ((gate, 0, half), (up, half, shape[1]))]
    return [(f"{pre}.{e}.{down}.weight", e) for e in range(shape[0])]


@pytest.mark.parametrize("family,kinds", [("qwen3_moe", ("harm", "retain")), ("gpt_oss", ("harm",))])
def test_expert_scores_match_torch_autograd(tiny, family, kinds):
    """Signed SNIP (-W * sum_i dL_i/dW) and retain (|W| * sum_i |dL_i/dW|) of every expert
    matrix and router, keyed by the checkpoint's names, equal autograd run one example at a time."""
    hf, model = tiny[family]
    names = scored_names(model.config)
    assert any(".experts." in n for n in names) and any(n.endswith(("gate.weight", "router.weight")) for n in names)
    assert not any(n.endswith(("_bias", "sinks")) for n in names)
    ref = _torch_expert_grads(hf, family, EXAMPLES)
    res = scan(model, EXAMPLES, kinds, batch_size=3, num_buckets=1, progress=False).scores
    for kind in kinds:
        ours = flatten(res[kind])
        want = {}
        for n in ours:
            w, g, a = ref[n]
            want[n] = -w * g if kind == "harm" else np.abs(w) * a
        _assert_close(ours, want)
        expert = np.concatenate([np.ravel(v) for n, v in want.items() if ".experts." in n])
        assert (expert != 0).mean() > 0.5  # the experts really got tokens


def test_mxfp4_dequantization_matches_transformers(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 8, 2, 16), dtype=np.uint8)  # (experts, rows, groups, 16)
    scales = rng.integers(120, 134, (3, 8, 2), dtype=np.uint8)
    ref = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=torch.float32).numpy()
    np.testing.assert_array_equal(mxfp4.dequantize(blocks, scales), ref)
    # Through the loader: a file with *_blocks/*_scales gives the plain name, any expert slice.
    write_tensors(str(tmp_path), {"x.gate_up_proj_blocks": blocks, "x.gate_up_proj_scales": scales})
    with TensorReader(str(tmp_path)) as reader:
        shapes = {n: reader.shape(n) for n in reader.names()}
        pairs = mxfp4.packed_pairs(shapes)
        assert mxfp4.plain_shapes(shapes, pairs) == {"x.gate_up_proj": ref.shape}
        part = mxfp4.read_dequantized(reader, pairs["x.gate_up_proj"], (slice(1, 3), slice(None), slice(2, 5)), np.float32)
    np.testing.assert_array_equal(part, ref[1:3, :, 2:5])


def test_unsupported_quantization_is_named(tmp_path):
    d = save_tiny(tiny_moe_model("mixtral"), tmp_path)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(UnsupportedArchitectureError, match="awq"):
        harmjax.load(d)


def test_mask_for_another_expert_count_is_refused(tiny, tmp_path):
    _, model = tiny["mixtral"]
    other = harmjax.load(save_tiny(tiny_moe_model("mixtral", num_local_experts=6), tmp_path), mesh=_mesh())
    mask = jax.tree.map(lambda w: np.zeros(w.shape, bool), other.params)
    with pytest.raises(MaskMismatchError, match=r"model\.layers\.0\.block_sparse_moe\.(gate\.weight|experts\.4)"):
        check_mask_fits(model.params, mask)
    own = unflatten({n: np.zeros(np.shape(w), bool) for n, w in flatten(model.params).items()})
    check_mask_fits(model.params, own)

