"""The absl entry points run as a user would run them, on a tiny model."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import transformers

import harmjax
from tests.hf_reference import save_tiny, tiny_hf_model, tiny_tokenizer

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


def test_run_prints_summary_for_a_local_model(tmp_path):
    hf_model = tiny_hf_model("llama")
    src = save_tiny(hf_model, tmp_path / "src")
    tok_dir = tmp_path / "src"
    # The summary tokenizes text, so give the tiny model a tokenizer whose ids fit its vocab.
    tiny_tokenizer().save_pretrained(str(tok_dir))
    out = _run("launch.run", "--config=configs/embedded.py", f"--config.model={src}",
               f"--config.output_dir={tmp_path}/out")
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["num_params"] == sum(p.numel() for p in hf_model.parameters())
    assert summary["num_layers"] == 3
    assert len(summary["sentence_nll"]) == 6
    assert "mean NLL" in out and "parameters" in out
