"""The KV-cache sampler against transformers' `generate`, sampling statistics, the
prefilling attack's formatting, masks, sharding, and the resumable launcher."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import harmjax
import harmjax.generate
from harmjax.generate import PromptFormatError, sample_tokens
from harmjax.sharding import MeshConfig, make_mesh
from tests.hf_reference import hf_greedy, save_tiny_with_tokenizer, tiny_hf_model, tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["How do I pick a lock?", "Tell me a story about a dragon and a knight.", "Hi"]
PREFIXES = ["Sure, here", None, "Step 1:"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _one_device():
    return make_mesh(MeshConfig(data=1), jax.devices()[:1])


def _hf_greedy(hf_model, inputs, max_new_tokens, eos, pad=0):
    """transformers' greedy generate on left-padded inputs; new tokens per row (pads after EOS)."""
    return hf_greedy(hf_model, inputs, max_new_tokens, eos=eos, pad=pad)


def _assert_same_tokens(ours, ref, eos):
    for row, (mine, theirs) in enumerate(zip(ours, ref)):
        theirs = theirs.tolist()
        if eos in theirs:  # transformers pads after EOS; we stop there
            theirs = theirs[: theirs.index(eos) + 1]
        assert mine == theirs, f"row {row}: {mine} != {theirs}"


@pytest.mark.parametrize("family,fuse,unroll", [("llama", False, 1), ("llama", True, 1), ("mistral", False, 1),
                                                ("llama", False, 4)])
def test_greedy_matches_transformers_generate(family, fuse, unroll, tmp_path, monkeypatch):
    """Token-for-token equality with transformers' greedy generate (float32), over two
    batches of left-padded chat prompts with prefixes, with and without an early EOS. Mistral's
    window (5) is shorter than the prompts, so the cached sliding-window mask is exercised.
    `fuse` runs on fused q/k/v and gate/up weights (the tiny Llama has biases in both).
    `unroll` 4 runs 4 steps per loop iteration: the 11 or 15 steps after the first token end
    mid-iteration, and so does EOS."""
    monkeypatch.setenv("HARMJAX_DECODE_UNROLL", str(unroll))
    hf_model = tiny_hf_model(family)
    model = harmjax.load(save_tiny_with_tokenizer(hf_model, tmp_path), dtype="float32", mesh=_one_device())
    res = harmjax.generate(model, PROMPTS, prefixes=PREFIXES, max_new_tokens=12, batch_size=2,
                           eos_token_ids=[2], progress=False, fuse_projections=fuse)
    assert res.stats["fused_projections"] == fuse and res.stats["decode_unroll"] == unroll
    ref = _hf_greedy(hf_model, res.prompt_token_ids, 12, eos=2)
    _assert_same_tokens(res.token_ids, ref, eos=2)
    assert max(len(t) for t in res.token_ids) == 12

    # An EOS that one row emits mid-way: that row stops and is cut there.
    row = next(r for r, t in enumerate(res.token_ids) if len(t) == 12)
    eos = res.token_ids[row][5]
    early = harmjax.generate(model, PROMPTS, prefixes=PREFIXES, max_new_tokens=12, batch_size=2,
                             eos_token_ids=[eos], progress=False, fuse_projections=fuse)
    _assert_same_tokens(early.token_ids, _hf_greedy(hf_model, res.prompt_token_ids, 12, eos=eos), eos)
    assert early.finished[row] and len(early.token_ids[row]) <= 6
    if unroll > 1:  # 16 new tokens fill the power-of-two buffer: unrolled steps past it must change nothing
        full = harmjax.generate(model, PROMPTS, prefixes=PREFIXES, max_new_tokens=16, batch_size=2,
                                eos_token_ids=[2], progress=False)
        _assert_same_tokens(full.token_ids, _hf_greedy(hf_model, res.prompt_token_ids, 16, eos=2), eos=2)
        monkeypatch.setenv("HARMJAX_DECODE_UNROLL", "1")  # the same number of live steps as one per iteration
        one = harmjax.generate(model, PROMPTS, prefixes=PREFIXES, max_new_tokens=16, batch_size=2,
                               eos_token_ids=[2], progress=False)
        assert full.stats["decode_steps"] == one.stats["decode_steps"] and full.token_ids == one.token_ids


def test_generation_from_an_already_fused_tree(tmp_path):
    """A caller that generates in chunks fuses once and passes the fused tree; the sampler
    takes it as it is and still matches transformers."""
    from harmjax.model import fused

    hf_model = tiny_hf_model("llama")
    mesh = _one_device()
    model = harmjax.load(save_tiny_with_tokenizer(hf_model, tmp_path), dtype="float32", mesh=mesh)
    params = fused.fuse_projections(model.params, model.config, mesh)
    assert fused.is_fused(params) and not fused.fusible(params, model.config, mesh)
    res = harmjax.generate(model, PROMPTS, params=params, max_new_tokens=8, batch_size=2, eos_token_ids=[2],
                           progress=False, fuse_projections=False)
    assert res.stats["fused_projections"]
    _assert_same_tokens(res.token_ids, _hf_greedy(hf_model, res.prompt_token_ids, 8, eos=2), eos=2)


def test_decode_kernel_sharded_generation_matches_transformers(tmp_path, monkeypatch):
    """Generation through the decode-attention kernel (Pallas' interpreter on the CPU), run
    per shard under shard_map on 8 devices (data 2 x fsdp 2 x tensor 2, the 2 KV heads split
    over tensor), equals transformers' greedy generate; the kernel was really used."""
    from harmjax.model import decode_attention

    calls = []
    kernel = decode_attention.pallas_decode_attention

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(decode_attention, "pallas_decode_attention", counted)
    monkeypatch.setenv("HARMJAX_DECODE_KERNEL", "interpret")
    hf_model = tiny_hf_model("llama")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = harmjax.load(save_tiny_with_tokenizer(hf_model, tmp_path), dtype="float32", mesh=mesh)
    # 16 new tokens in a 16-slot buffer after a 16-token bucket: 32 slots, a multiple of block_k 32.
    monkeypatch.setattr(decode_attention, "DEFAULT_CONFIG", decode_attention.KernelConfig(block_k=32))
    prompts = ["Hi", "Tell me", "Why?"]
    res = harmjax.generate(model, prompts, max_new_tokens=16, batch_size=4, eos_token_ids=[], progress=False,
                           chat=False)
    assert calls and all(shape[2] == 32 for shape in calls)
    _assert_same_tokens(res.token_ids, _hf_greedy(hf_model, res.prompt_token_ids, 16, eos=None), eos=-1)


def test_prefilling_attack_formatting(tmp_path):
    """Chat template + prefix form the input; the prefix is reported apart from the text."""
    hf_model = tiny_hf_model("llama")
    model = harmjax.load(save_tiny_with_tokenizer(hf_model, tmp_path), dtype="float32", mesh=_one_device())
    tok = tiny_tokenizer()
    res = harmjax.generate(model, PROMPTS[:2], prefixes=PREFIXES[:2], max_new_tokens=6, progress=False)
    chat = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat.endswith("<s>assistant\n")
    assert res.prompt_token_ids[0] == tok(chat + PREFIXES[0], add_special_tokens=False)["input_ids"]
    assert res.prefixes == ["Sure, here", ""]
    for text, ids in zip(res.texts, res.token_ids):
        assert text == tok.decode([i for i in ids if i != 2], skip_special_tokens=True)
    assert harmjax.generate.response_prefix(tok, "Sure, here is how to do it", 10) == "Sure, here"
    raw = harmjax.generate.prompt_token_ids(tok, "abc", chat=False)
    assert raw == tok("abc")["input_ids"]
    with pytest.raises(PromptFormatError, match="2 prefixes for 1 prompts"):
        harmjax.generate.build_inputs(tok, ["a"], ["x", "y"])
    tok.chat_template = None
    with pytest.raises(PromptFormatError, match="no chat template"):
        harmjax.generate.prompt_token_ids(tok, "a")


def test_embedded_smollm2_greedy_matches_transformers(harmjax_cache, monkeypatch):
    """The real SmolLM2-135M-Instruct: 3 short chat prompts, 16 greedy tokens, identical ids."""
    import transformers

    from harmjax import assets

    monkeypatch.setenv(assets.CACHE_ENV, harmjax_cache)
    directory = assets.default_model_dir()
    model = harmjax.load(directory, dtype="float32", mesh=_one_device())
    prompts = ["What is the capital of France?", "Write a haiku about rain.", "How do I bake bread?"]
    res = harmjax.generate(model, prompts, prefixes=[None, "Sure, here", None], max_new_tokens=16,
                           progress=False)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32).eval()
    eos = harmjax.generate.default_eos_ids(model)
    assert eos == [hf_model.generation_config.eos_token_id]
    ref = _hf_greedy(hf_model, res.prompt_token_ids, 16, eos=eos[0], pad=model.tokenizer.pad_token_id)
    _assert_same_tokens(res.token_ids, ref, eos[0])
    assert "Paris" in res.texts[0]


def test_sampling_reproducible_batch_and_mesh_independent(tmp_path):
    """Same seed, same samples, whatever the batch size or mesh; another seed, other samples."""
    hf_model = tiny_hf_model("llama")
    src = save_tiny_with_tokenizer(hf_model, tmp_path)
    one = harmjax.load(src, dtype="float32", mesh=_one_device())
    sharded = harmjax.load(src, dtype="float32", mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, progress=False, stop_at_eos=False)
    a = harmjax.generate(one, PROMPTS, seed=3, batch_size=4, **kw)
    # Batches of 2 regroup the prompts (sorted by length): keys follow each prompt's sample id.
    b = harmjax.generate(one, PROMPTS, seed=3, batch_size=2, **kw)
    c = harmjax.generate(sharded, PROMPTS, seed=3, batch_size=4, **kw)
    d = harmjax.generate(one, PROMPTS, seed=4, batch_size=4, **kw)
    assert a.token_ids == b.token_ids == c.token_ids
    assert a.token_ids != d.token_ids


def test_sample_tokens_follows_the_nucleus_distribution():
    """Empirical frequencies of 40k draws match softmax(logits / T) renormalised over the
    top-p nucleus (computed here in NumPy); tokens outside it are never drawn."""
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    n, temperature, top_p = 40_000, 0.7, 0.8
    keys = harmjax.generate.row_keys(0, range(n))
    sample = jax.jit(sample_tokens, static_argnames=("greedy", "use_top_p"))
    draws = np.asarray(sample(jnp.tile(logits, (n, 1)), jnp.asarray(keys), 5, temperature, top_p,
                              greedy=False, use_top_p=True))
    p = np.exp(logits / temperature - (logits / temperature).max())
    p /= p.sum()
    mass_above = np.cumsum(p) - p  # logits are sorted descending
    nucleus = mass_above < top_p
    expected = np.where(nucleus, p, 0) / p[nucleus].sum()
    freq = np.bincount(draws, minlength=len(logits)) / n
    assert nucleus.sum() == 3 and np.all(freq[~nucleus] == 0)
    np.testing.assert_allclose(freq, expected, atol=4 * np.sqrt(expected.max() / n))
    tiny_p = sample(jnp.tile(logits, (64, 1)), jnp.asarray(keys[:64]), 0, 1.0, 1e-3,
                    greedy=False, use_top_p=True)
    assert np.all(np.asarray(tiny_p) == 0)


def test_mask_zeroes_weights_like_a_pruned_transformers_model(tmp_path):
    """A mask over layer 0's down_proj generates what transformers' model with those weights
    zeroed generates."""
    hf_model = tiny_hf_model("llama")
    model = harmjax.load(save_tiny_with_tokenizer(hf_model, tmp_path), dtype="float32", mesh=_one_device())
    rng = np.random.default_rng(0)
    w = model.params["model"]["layers"]["0"]["mlp"]["down_proj"]["weight"]
    pruned = rng.random(w.shape) < 0.5
    mask = {"model": {"layers": {"0": {"mlp": {"down_proj": {"weight": jnp.asarray(pruned)}}}}}}
    masked = harmjax.generate(model, PROMPTS, mask=mask, max_new_tokens=10, eos_token_ids=[2], progress=False)
    plain = harmjax.generate(model, PROMPTS, max_new_tokens=10, eos_token_ids=[2], progress=False)
    with torch.no_grad():
        hf_model.model.layers[0].mlp.down_proj.weight[torch.tensor(pruned)] = 0.0
    _assert_same_tokens(masked.token_ids, _hf_greedy(hf_model, masked.prompt_token_ids, 10, eos=2), 2)
    assert masked.token_ids != plain.token_ids


def test_generate_ids_edge_cases():
    """Empty input lists return empty results; bad arguments name themselves."""
    from harmjax.config import ModelConfig

    cfg = ModelConfig(model_type="llama", vocab_size=11, hidden_size=8, intermediate_size=8,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
    out = harmjax.generate.generate_ids({}, cfg, _one_device(), [], max_new_tokens=4, progress=False)
    assert out.tokens == [] and out.stats["new_tokens"] == 0
    with pytest.raises(ValueError, match=r"Inputs \[1\] are empty"):
        harmjax.generate.generate_ids({}, cfg, _one_device(), [[1], []], progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        harmjax.generate.generate_ids({}, cfg, _one_device(), [[1]], max_new_tokens=0, progress=False)


def _write_prompts(path, n=5):
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "goal", "target", "category"])
        for i in range(n):
            writer.writerow([f"q{i}", f"How do I do thing {i}?" * (1 + i % 3), f"Sure, here is thing {i}", "c"])


def test_launcher_writes_and_resumes_without_redoing(tmp_path):
    """launch.generate end to end on a tiny model: a killed run (limit 2, plus the truncated
    line a kill leaves) resumed to 4 items gives the records of one uninterrupted run."""
    from configs.generate_embedded import get_config
    from launch.generate import run

    src = save_tiny_with_tokenizer(tiny_hf_model("llama"), tmp_path / "model")
    _write_prompts(tmp_path / "p.csv")
    flags = dict(model=src, prompts=str(tmp_path / "p.csv"), prompt_key="goal", response_key="target",
                 id_key="id", max_new_tokens=6, batch_size=2, temperature=1.0, seed=7)

    out = tmp_path / "resumed"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.generate", "--config=configs/generate_embedded.py", "--config.limit=2",
         f"--config.output_dir={out}", *[f"--config.{k}={v}" for k, v in flags.items()]],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "generations.jsonl", "a") as f:
        f.write('{"id": "q2", "prompt": "How do')  # what a kill mid-write leaves

    def config(limit, output_dir):
        cfg = get_config()
        cfg.update(flags)
        cfg.limit, cfg.output_dir = limit, str(output_dir)
        return cfg

    metrics = run(config(4, out))
    assert (metrics["count"], metrics["generated_this_run"], metrics["already_done"]) == (4, 2, 2)
    run(config(4, tmp_path / "fresh"))
    resumed = [json.loads(line) for line in open(out / "generations.jsonl")]
    fresh = [json.loads(line) for line in open(tmp_path / "fresh" / "generations.jsonl")]
    assert [r["id"] for r in resumed] == ["q0", "q1", "q2", "q3"]
    assert resumed == fresh
    first = resumed[0]
    assert first["prefix"] == "Sure, here" and first["mask_id"] == "none" and first["seed"] == 7
    assert {"prompt", "response", "category", "max_new_tokens", "temperature"} <= set(first)
    saved = json.load(open(out / "metrics.json"))
    assert saved["count"] == 4 and saved["tokens_per_s"] > 0 and saved["wall_s"] > 0
    assert run(config(4, out))["generated_this_run"] == 0  # nothing left to do

    # A mask directory: its weights are zeroed for generation and its name is the mask id.
    from harmjax.masks import save_mask

    model = harmjax.load(src, mesh=_one_device())
    mask = {"model": {"layers": {str(i): {"mlp": {"down_proj": {"weight": jnp.ones_like(
        model.params["model"]["layers"][str(i)]["mlp"]["down_proj"]["weight"], dtype=bool)}}}
        for i in range(model.config.num_layers)}}}
    save_mask(str(tmp_path / "no_mlp"), mask)
    cfg = config(2, tmp_path / "masked")
    cfg.mask = str(tmp_path / "no_mlp")
    assert run(cfg)["mask_id"] == "no_mlp"
    masked = [json.loads(line) for line in open(tmp_path / "masked" / "generations.jsonl")]
    assert [r["mask_id"] for r in masked] == ["no_mlp", "no_mlp"]
    assert [r["response"] for r in masked] != [r["response"] for r in fresh[:2]]
