"""Fine-tuning steps against PyTorch: rsLoRA (peft) and full fine-tuning, 3 AdamW steps with
transformers' warm-up schedule, clip_grad_norm_ and token-weighted gradient accumulation;
pruned weights stay exactly zero; exports load in peft and read back through safetensors."""

import copy
import json
import os

import chex
import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import harmjax
from harmjax.data import Example
from harmjax.io.lora import merge_lora, read_lora_adapter
from harmjax.sharding import MeshConfig, make_mesh
from harmjax.train import (
    LoraConfig, TrainConfig, apply_lora, export_merged, export_peft, finetune, init_lora, lr_schedule,
)
from harmjax.train.data import prepare
from harmjax.tree import flatten, unflatten
from tests.hf_reference import save_tiny_with_tokenizer, tiny_hf_model

FORWARD = jax.jit(harmjax.forward, static_argnums=1)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA = LoraConfig(r=4, alpha=8.0, dropout=0.0, use_rslora=True)
# eps 1e-6 (both sides): Adam divides by sqrt(v) + eps, so an entry whose gradient nearly cancels
# (|g| ~ 1e-7) amplifies float32 rounding (~1e-9) by lr / eps; this bounds that to ~1e-6.
# max_length 48: one padding bucket, so one compilation per run.
CFG = TrainConfig(lr=5e-3, eps=1e-6, warmup_steps=1, weight_decay=0.05, max_grad_norm=0.5, batch_size=4,
                  micro_batch_size=2, epochs=1, max_length=48, val_fraction=0.0, seed=3)


def _examples(n=12, seed=0):
    rng = np.random.default_rng(seed)
    words = ["lock", "pick", "the", "door", "sure", "here", "is", "a", "plan", "no", "step", "first"]
    out = []
    for i in range(n):
        p = " ".join(rng.choice(words, rng.integers(2, 6)))
        r = " ".join(rng.choice(words, rng.integers(1, 9)))
        out.append(Example(prompt=p, response=r, id=str(i)))
    return out


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = tiny_hf_model("llama", seed=1, num_hidden_layers=2)  # 2 layers: faster compiles
    d = save_tiny_with_tokenizer(hf, tmp_path_factory.mktemp("tiny"))
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    return hf, harmjax.load(d, dtype="float32", mesh=mesh)


def _mask(model, seed=0, frac=0.05):
    """Random mask over the 7 projections of every layer (True = pruned)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, w in flatten(model.params).items():
        if name.startswith("model.layers.") and name.split(".")[-2] in PROJ:
            flat[name] = rng.random(w.shape) < frac
    return unflatten(flat)


def _hf_copy(hf, params=None):
    """A copy of the HF model, optionally with harmjax params loaded into it."""
    m = copy.deepcopy(hf)
    if params is not None:
        sd = {k: torch.tensor(np.asarray(v)) for k, v in flatten(params).items()}
        m.load_state_dict(sd, strict=False)
    return m


def _torch_nll_sum(model, b):
    ids, att, lm = (torch.tensor(b[k]).long() for k in ("input_ids", "attention_mask", "loss_mask"))
    logits = model(input_ids=ids, attention_mask=att).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    return (nll * lm[:, 1:]).sum()


def _torch_train(model, params, data, cfg, total, after_step=None):
    """transformers-Trainer-style loop: token-weighted accumulation, clip, AdamW, scheduler."""
    decay = [p for n, p in params if not n.endswith("bias") and "norm" not in n]
    opt = torch.optim.AdamW(decay, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    sched = transformers.get_linear_schedule_with_warmup(opt, cfg.warmup_steps, total)
    for step in range(total):
        batch = data.step_batch(step)
        n_items = batch["loss_mask"][:, :, 1:].sum()
        for i in range(batch["input_ids"].shape[0]):
            (_torch_nll_sum(model, {k: v[i] for k, v in batch.items()}) / n_items).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        if after_step:
            after_step()


def test_schedule_matches_transformers():
    """lr_schedule == get_{linear,cosine,constant}_schedule_with_warmup at every step."""
    p = torch.nn.Parameter(torch.zeros(1))
    makers = {"linear": transformers.get_linear_schedule_with_warmup,
              "cosine": transformers.get_cosine_schedule_with_warmup,
              "constant": lambda o, w, t: transformers.get_constant_schedule_with_warmup(o, w)}
    for kind, make in makers.items():
        cfg = TrainConfig(lr=1e-3, warmup_steps=5, schedule=kind)
        opt = torch.optim.SGD([p], lr=1e-3)
        sched = make(opt, 5, 23)
        ours = lr_schedule(cfg, 23)
        for step in range(25):
            np.testing.assert_allclose(float(ours(step)), opt.param_groups[0]["lr"], rtol=1e-5, atol=1e-10,
                                       err_msg=f"{kind} step {step}")
            opt.step()
            sched.step()


def _peft_model(hf, adapters, lora_cfg=LORA):
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=0.0, use_rslora=lora_cfg.use_rslora,
        target_modules=list(lora_cfg.targets), bias="none"))
    with torch.no_grad():
        for name, leaf in flatten(adapters).items():
            module, which = name.rsplit(".", 1)
            target = pm.get_submodule("base_model.model." + module)
            getattr(target, which)["default"].weight.copy_(torch.tensor(np.asarray(leaf)))
    return pm


def _random_adapters(model, seed=0):
    ad = init_lora(jax.random.PRNGKey(seed), model.config, LORA, model.mesh)
    rng = np.random.default_rng(seed)
    return unflatten({n: (np.asarray(x) if n.endswith("lora_A") else rng.normal(0, 0.1, x.shape).astype(np.float32))
                      for n, x in flatten(ad).items()})


def test_lora_forward_matches_peft(tiny):
    """Logits of the adapted decoder equal peft's LoRA model (nonzero B); with a mask, equal a
    plain torch model whose weights are (W + scale B A) * ~M, on the sparse and dense paths."""
    hf, model = tiny
    adapters = _random_adapters(model)
    ids = np.random.default_rng(0).integers(3, 101, (2, 11))
    ours = FORWARD(apply_lora(model.params, adapters, LORA), model.config, ids)
    with torch.no_grad():
        ref = _peft_model(hf, adapters)(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=1e-5)

    mask = _mask(model, seed=1)
    pruned = harmjax.apply_mask(model.params, mask)
    eff = {}
    for name, w in flatten(pruned).items():
        module = name[: -len(".weight")]
        a = flatten(adapters).get(module + ".lora_A")
        if a is not None:
            b = flatten(adapters)[module + ".lora_B"]
            m = flatten(mask)[name]
            w = np.where(m, 0.0, np.asarray(w, np.float64) + LORA.scale * (b.astype(np.float64) @ a))
        eff[name] = np.asarray(w, np.float32)
    with torch.no_grad():
        ref = _hf_copy(hf, unflatten(eff))(input_ids=torch.tensor(ids)).logits.numpy()
    for sparse in (True, False):
        plans = harmjax.train.mask_plans(mask, model.config, LORA, sparse=sparse)
        assert ("rows" in next(iter(plans.values()))) == sparse
        ours = FORWARD(apply_lora(pruned, adapters, LORA, plans), model.config, ids)
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=1e-5, err_msg=f"sparse={sparse}")


def test_lora_three_steps_match_peft(tiny, tmp_path):
    """3 steps of rsLoRA (same lora_A init) equal peft + torch AdamW within 1e-5 on A, B and the
    merged weights; the PEFT export loads in peft and in harmjax.io.lora."""
    hf, model = tiny
    examples = _examples()
    res = finetune(model, examples, CFG, lora=LORA, progress=False)
    assert res.steps == 3 and res.resumed_from is None and res.val_loss is None

    init = init_lora(jax.random.PRNGKey(CFG.seed), model.config, LORA, model.mesh)
    pm = _peft_model(hf, init)
    pm.train()
    data = prepare(model.tokenizer, examples, CFG.batch_size, CFG.micro_batch_size, CFG.max_length,
                   CFG.val_fraction, CFG.seed, CFG.text_format)
    _torch_train(pm, [(n, p) for n, p in pm.named_parameters() if p.requires_grad], data, CFG, 3)
    for name, leaf in flatten(res.adapters).items():
        module, which = name.rsplit(".", 1)
        ref = getattr(pm.get_submodule("base_model.model." + module), which)["default"].weight.detach().numpy()
        np.testing.assert_allclose(np.asarray(leaf), ref, atol=1e-5, rtol=0, err_msg=name)
    assert np.abs(np.asarray(flatten(res.adapters)["model.layers.0.mlp.up_proj.lora_B"])).max() > 1e-3

    merged_ref = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    for name, w in flatten(res.params).items():
        np.testing.assert_allclose(np.asarray(w), merged_ref[name], atol=1e-5, rtol=0, err_msg=name)

    out = export_peft(res.adapters, LORA, str(tmp_path / "peft"), base_model_name_or_path="tiny")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out)
    ids = np.random.default_rng(1).integers(3, 101, (2, 9))
    with torch.no_grad():
        peft_logits = loaded(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(peft_logits, np.asarray(FORWARD(res.params, model.config, ids)), atol=1e-5)
    chex.assert_trees_all_close(merge_lora(model.params, read_lora_adapter(out)), res.params, atol=1e-6, rtol=0)


def _torch_masked_lora(hf, adapters, mask, scale):
    """A torch model whose adapted Linear layers compute x ((W + scale B A) * ~M)^T + b with
    trainable float32 A and B: the masked-LoRA reference, independent of peft."""
    model = copy.deepcopy(hf)
    params = []
    flat_mask = flatten(mask)
    for name, leaf in flatten(adapters).items():
        module, which = name.rsplit(".", 1)
        if which != "lora_A":
            continue
        lin = model.get_submodule(module)
        A = torch.nn.Parameter(torch.tensor(np.asarray(leaf)))
        B = torch.nn.Parameter(torch.tensor(np.asarray(flatten(adapters)[module + ".lora_B"])))
        keep = torch.tensor(~np.asarray(flat_mask[module + ".weight"]))
        lin.weight.requires_grad_(False)
        lin.forward = (lambda x, lin=lin, A=A, B=B, keep=keep:
                       torch.nn.functional.linear(x, (lin.weight + scale * B @ A) * keep, lin.bias))
        params += [(module + ".lora_A", A), (module + ".lora_B", B)]
    for p in model.parameters():
        p.requires_grad_(False)
    return model, params


@pytest.mark.parametrize("frac", [0.005, 0.05])  # sparse and dense masked corrections
def test_masked_lora_steps_and_exports_keep_pruned_zero(tiny, tmp_path, frac):
    """rsLoRA on a pruned model: 3 steps equal a torch reference with effective weights
    (W + scale B A) * ~M; merged weights and the merged HF export are exactly 0.0 where pruned;
    the PEFT export carries the mask and says so."""
    hf, model = tiny
    mask = _mask(model, seed=2, frac=frac)
    plans = harmjax.train.mask_plans(mask, model.config, LORA)
    assert all(("rows" in p) == (frac < 0.01) for p in plans.values())
    pruned = model.with_params(harmjax.apply_mask(model.params, mask))
    examples = _examples(seed=1)
    res = finetune(pruned, examples, CFG, lora=LORA, mask=mask, progress=False)

    init = init_lora(jax.random.PRNGKey(CFG.seed), model.config, LORA, model.mesh)
    ref_model, params = _torch_masked_lora(_hf_copy(hf, pruned.params), init, mask, LORA.scale)
    data = prepare(model.tokenizer, examples, CFG.batch_size, CFG.micro_batch_size, CFG.max_length,
                   CFG.val_fraction, CFG.seed, CFG.text_format)
    _torch_train(ref_model, params, data, CFG, 3)
    for name, p in params:
        np.testing.assert_allclose(np.asarray(flatten(res.adapters)[name]), p.detach().numpy(), atol=1e-5, err_msg=name)

    flat, flat_mask = flatten(res.params), flatten(mask)
    moved = 0
    for name, m in flat_mask.items():
        w = np.asarray(flat[name])
        assert np.all(w[m] == 0.0), name
        moved += int(np.sum(w[~m] != np.asarray(flatten(pruned.params)[name])[~m]))
    assert moved > 0

    merged_dir = export_merged(pruned, res.params, str(tmp_path / "merged"))
    tensors = {}
    for f in os.listdir(merged_dir):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(merged_dir, f)))
    for name, m in flat_mask.items():
        assert np.all(tensors[name][m] == 0.0), name
        np.testing.assert_array_equal(tensors[name], np.asarray(flat[name]))

    peft_dir = export_peft(res.adapters, LORA, str(tmp_path / "peft"), mask=mask)
    assert "mask_indices.safetensors" in open(os.path.join(peft_dir, "README.md")).read()
    back = load_file(os.path.join(peft_dir, "mask_indices.safetensors"))
    for name, m in flat_mask.items():
        np.testing.assert_array_equal(back[name], np.flatnonzero(np.asarray(m)))
    cfg = json.load(open(os.path.join(peft_dir, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] and cfg["r"] == 4


def test_full_finetune_three_steps_match_torch_and_keep_pruned_zero(tiny):
    """Full fine-tuning of the 7 projections (with a mask) for 3 steps equals torch AdamW with the
    pruned weights re-zeroed after each step, within 1e-5; pruned weights are exactly 0.0."""
    hf, model = tiny
    mask = _mask(model, seed=3)
    pruned = model.with_params(harmjax.apply_mask(model.params, mask))
    examples = _examples(seed=2)
    cfg = CFG
    res = finetune(pruned, examples, cfg, mask=mask, progress=False)
    assert res.adapters is None

    ref = _hf_copy(hf, pruned.params)
    flat_mask = flatten(mask)
    trained = [(n, p) for n, p in ref.named_parameters() if n.split(".")[-2] in PROJ and n.endswith("weight")]
    for n, p in ref.named_parameters():
        p.requires_grad_(any(n == t for t, _ in trained))

    def rezero():
        with torch.no_grad():
            for n, p in trained:
                p.mul_(torch.tensor(~flat_mask[n]))

    data = prepare(model.tokenizer, examples, cfg.batch_size, cfg.micro_batch_size, cfg.max_length,
                   cfg.val_fraction, cfg.seed, cfg.text_format)
    _torch_train(ref, trained, data, cfg, 3, after_step=rezero)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    flat = flatten(res.params)
    for name, w in flat.items():
        np.testing.assert_allclose(np.asarray(w), sd[name], atol=1e-5, rtol=0, err_msg=name)
        if name in flat_mask:
            assert np.all(np.asarray(w)[flat_mask[name]] == 0.0), name
    assert not np.allclose(np.asarray(flat["model.layers.1.mlp.down_proj.weight"]),
                           np.asarray(flatten(pruned.params)["model.layers.1.mlp.down_proj.weight"]))
    # Norms and embeddings were not trained.
    np.testing.assert_array_equal(np.asarray(flat["model.norm.weight"]), np.asarray(flatten(model.params)["model.norm.weight"]))
