"""LoRA on mixture-of-experts models: adapters go on attention and dense-MLP
projections only, matching peft restricted to the same modules; a target the model has only
inside its experts is refused with a one-line error rather than silently dropped."""

from __future__ import annotations

import copy

import jax
import numpy as np
import peft
import pytest
import torch

import harmjax
from harmjax.errors import UnsupportedArchitectureError
from harmjax.sharding import MeshConfig, make_mesh
from harmjax.train import LoraConfig, apply_lora, init_lora
from harmjax.train.lora import PROJECTIONS, adapted_weight_names
from harmjax.tree import flatten, unflatten
from tests.hf_reference import save_tiny
from tests.moe_reference import tiny_moe_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py
LORA = LoraConfig(r=4, alpha=8.0, dropout=0.0, use_rslora=True)  # all 7 projections


def _load(family, tmp_path):
    hf = tiny_moe_model(family)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    return hf, harmjax.load(save_tiny(hf, tmp_path), dtype="float32", mesh=mesh)


def test_lora_on_qwen3_moe_adapts_attention_and_dense_mlp_like_peft(tmp_path):
    """The fixture's layer 1 is a dense MLP (mlp_only_layers): every layer's q/k/v/o and layer
    1's gate/up/down get adapters, no router or expert; with nonzero B the logits equal peft's
    LoRA model on exactly those modules (peft itself would also wrap the fused experts)."""
    hf, model = _load("qwen3_moe", tmp_path)
    names = adapted_weight_names(model.config, LORA)
    expected = [f"model.layers.{i}.self_attn.{p}.weight" for i in range(3) for p in PROJECTIONS[:4]]
    expected += [f"model.layers.1.mlp.{p}.weight" for p in PROJECTIONS[4:]]
    assert sorted(names) == sorted(expected)

    ad = init_lora(jax.random.PRNGKey(0), model.config, LORA, model.mesh)
    rng = np.random.default_rng(0)
    adapters = unflatten({n: np.asarray(x) if n.endswith("lora_A") else rng.normal(0, 0.1, x.shape).astype(np.float32)
                          for n, x in flatten(ad).items()})
    ids = np.random.default_rng(1).integers(3, 101, (2, 9))
    ours = jax.jit(harmjax.forward, static_argnums=1)(apply_lora(model.params, adapters, LORA), model.config, ids)

    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=0.0, use_rslora=True, bias="none",
        target_modules=r".*layers\.\d+\.self_attn\.[qkvo]_proj|.*layers\.1\.mlp\.(gate|up|down)_proj"))
    with torch.no_grad():
        for name, leaf in flatten(adapters).items():
            module, which = name.rsplit(".", 1)
            getattr(pm.get_submodule("base_model.model." + module), which)["default"].weight.copy_(
                torch.tensor(np.asarray(leaf)))
        ref = pm(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,layers,missing", [
    ("mixtral", None, ["gate_proj", "up_proj", "down_proj"]),  # experts only (w1/w3/w2)
    ("qwen3_moe", (0, 2), ["gate_proj", "up_proj", "down_proj"]),  # layer 1's dense MLP not chosen
    ("gpt_oss", None, ["gate_proj", "up_proj", "down_proj"]),  # fused 3-D experts
])
def test_target_only_in_experts_is_refused(family, layers, missing, tmp_path):
    _, model = _load(family, tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="only as expert weights") as err:
        adapted_weight_names(model.config, LoraConfig(layers=layers))
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    attention = LoraConfig(targets=PROJECTIONS[:4], layers=layers)  # what the error suggests
    names = adapted_weight_names(model.config, attention)
    assert len(names) == 4 * len(layers or range(model.config.num_layers))
    assert all(".self_attn." in n for n in names)
