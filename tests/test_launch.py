"""The absl entry points run as a user would run them, on a tiny model."""

import os
import subprocess
import sys

import jax
import numpy as np
import transformers

import harmjax
from tests.hf_reference import save_tiny, tiny_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, env=None):
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_convert_writes_orbax_and_hf(tmp_path):
    hf_model = tiny_hf_model("qwen3")
    src = save_tiny(hf_model, tmp_path / "src")
    out = _run("launch.convert", f"--source={src}", f"--out_orbax={tmp_path}/orbax",
               f"--out_hf={tmp_path}/hf", "--dtype=float32")
    assert "qwen3" in out
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp_path}/hf")
    for name, value in hf_model.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), value.numpy(), err_msg=name)
    from_orbax = harmjax.load(f"{tmp_path}/orbax")
    ref = harmjax.load(src)
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(from_orbax.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))




def test_finetune_launcher_on_a_pruned_model(tmp_path):
    """launch.finetune's single-run mode: LoRA on a masked model from a chat JSONL; the merged
    HF export keeps pruned weights at exactly 0 and the PEFT export carries the mask."""
    import json

    import ml_collections
    from safetensors.numpy import load_file

    from configs.finetune import get_config
    from harmjax.masks import save_mask
    from launch.finetune import run
    from tests.hf_reference import save_tiny_with_tokenizer

    src = save_tiny_with_tokenizer(tiny_hf_model("llama", seed=2), tmp_path / "src")
    model = harmjax.load(src)
    rng = np.random.default_rng(0)
    mask = jax.tree.map(lambda w: rng.random(w.shape) < 0.05,
                        {"model": {"layers": {k: {b: {p: {"weight": v[b][p]["weight"]} for p in v[b] if p.endswith("proj")}
                                                  for b in ("self_attn", "mlp")}
                                              for k, v in model.params["model"]["layers"].items()}}})
    save_mask(str(tmp_path / "mask"), mask)
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for i in range(10):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                             {"role": "assistant", "content": f"answer number {i}."}]}) + "\n")
    cfg = get_config()
    cfg.model, cfg.data, cfg.mask, cfg.output_dir = src, str(data), str(tmp_path / "mask"), str(tmp_path / "out")
    cfg.mesh = ml_collections.ConfigDict({"data": 2, "fsdp": 1, "tensor": 4})
    cfg.lora.r, cfg.lora.alpha = 4, 8.0
    cfg.train.lr, cfg.train.batch_size, cfg.train.micro_batch_size, cfg.train.max_length = 1e-2, 4, 2, 48
    summary = run(cfg)
    assert summary["steps"] == 3 and summary["examples"] == 10  # 9 train / 1 validation, batches of 4
    merged = load_file(str(tmp_path / "out" / "merged" / "model.safetensors"))
    changed = 0
    for layer, blocks in mask["model"]["layers"].items():
        for block, projs in blocks.items():
            for proj, leaf in projs.items():
                name = f"model.layers.{layer}.{block}.{proj}.weight"
                assert (merged[name][leaf["weight"]] == 0.0).all(), name
                changed += int((merged[name] != np.asarray(model.params["model"]["layers"][layer][block][proj]["weight"])).sum())
    assert changed > 0  # training moved the unpruned weights

    # mask_indices.safetensors holds, per HF name, the flat indices of the mask's True entries.
    peft_dir = tmp_path / "out" / "peft"
    hf_mask = {f"model.layers.{layer}.{block}.{proj}.weight": leaf["weight"]
               for layer, blocks in mask["model"]["layers"].items()
               for block, projs in blocks.items() for proj, leaf in projs.items()}
    indices = load_file(str(peft_dir / "mask_indices.safetensors"))
    assert sorted(indices) == sorted(hf_mask)
    for name, m in hf_mask.items():
        np.testing.assert_array_equal(np.sort(indices[name]), np.flatnonzero(m), err_msg=name)

    # The adapter, loaded by PEFT onto the PyTorch base pruned with the same mask, merged and
    # re-pruned (as its README says), is harmjax's fine-tuned model: same weights, same logits.
    import peft
    import torch

    from tests.hf_reference import left_padded_batch, torch_logits

    ids, ids_mask, positions = left_padded_batch()
    base = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, m in hf_mask.items():
            base.get_parameter(name)[torch.from_numpy(m)] = 0.0
    pruned_only = torch_logits(base, ids, ids_mask, positions)  # before PEFT merges into `base`
    with torch.no_grad():
        reference = peft.PeftModel.from_pretrained(base, str(peft_dir)).merge_and_unload().eval()
        for name, m in hf_mask.items():
            reference.get_parameter(name)[torch.from_numpy(m)] = 0.0
    ref_state = {k: v.numpy() for k, v in reference.state_dict().items()}
    for name, value in merged.items():
        np.testing.assert_allclose(value, ref_state[name], rtol=1e-5, atol=1e-6, err_msg=name)
    tuned = harmjax.load(str(tmp_path / "out" / "merged"))
    ours = np.asarray(harmjax.forward(tuned.params, tuned.config, jax.numpy.asarray(ids), jax.numpy.asarray(ids_mask)))
    ref = torch_logits(reference, ids, ids_mask, positions)
    valid = ids_mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4 * ref[valid].std()  # tests/test_parity.py's tolerance
    # The adapter is not a no-op: without it the logits differ.
    assert np.abs(pruned_only - ref)[valid].max() > 1e-3


def test_bad_input_is_one_error_line_not_a_traceback(tmp_path):
    """Entry points print harmjax's input errors as one named line and exit with status 1."""
    missing = tmp_path / "no_such_model"
    result = subprocess.run(
        [sys.executable, "-m", "launch.convert", f"--source={missing}", f"--out_hf={tmp_path}/hf"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: MissingFileError: ") and str(missing) in last, result.stderr[-2000:]
    assert not (tmp_path / "hf").exists()


def test_init_runtime_sets_a_default_memory_fraction_the_user_can_override():
    """Launchers set XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 unless it is already set."""
    code = ("from absl import flags; import launch.common as c; flags.FLAGS(['x']); c.init_runtime(); "
            "import os; print(os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])")
    base = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
    base.update(JAX_PLATFORMS="cpu", HARMJAX_XLA_CACHE="off")
    for env, want in ((base, "0.9"), ({**base, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.6"}, "0.6")):
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == want
