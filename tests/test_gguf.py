"""Tests of harmjax.io.gguf against transformers' own (torch) GGUF loader.

A tiny llama model with a trained byte-level BPE vocabulary is written as GGUF with
`gguf.GGUFWriter` (F32, F16 and Q8_0 tensors, Q/K rows permuted the way llama.cpp's converter
permutes them), converted with `gguf_to_hf_dir`, and compared with what
`transformers.AutoModelForCausalLM/AutoTokenizer.from_pretrained(..., gguf_file=...)` build
from the same file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from harmjax.errors import (
    CheckpointError,
    DiskSpaceError,
    MissingFileError,
    UnsupportedArchitectureError,
    UnsupportedDtypeError,
)
from harmjax.io.gguf import gguf_to_hf_dir

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 64, 4, 2, 2, 128
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2's chat template.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! Hello there, how are you doing today? I'm fine, thanks.",
    "def main(argv):\n    return sum(x ** 2 for x in range(10))\n",
    "Ünïcödé tëxt: café, naïve, 日本語のテキスト, emoji 🤖🎉.",
    "Numbers 12345 and 3.14159 and 2024-01-01.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
]
# Strings the tokenizers must split identically.
TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "multiple     spaces and\ttabs\nand\n\n\nnewlines",
    "héllo wörld — naïve café",
    "日本語のテキスト and 🤖🎉 emoji",
    "don't won't it's I'M",
    "12345 67890 3.14159",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<think>reasoning</think> answer",
    "<|bad token|>",
    "def f(x):\n    return x**2\n",
    "",
    "a" * 200,
]
MESSAGES = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Héllo 🤖"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Again  with   spaces"},
    ],
]


def train_vocab() -> tuple[list[str], list[str], list[int]]:
    """A few hundred byte-level BPE tokens with merges, and llama.cpp token types."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if token in SPECIALS else 1 for token in tokens]
    # A USER_DEFINED token (added, not special), and a CONTROL token spelled outside the byte
    # alphabet, which transformers skips.
    tokens += ["<think>", "<|bad token|>"]
    types += [4, 3]
    return tokens, merges, types


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, copied as the independent reference."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def hf_weights(vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-layout llama weights."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: (0.1 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    weights = {"model.embed_tokens.weight": w(vocab, HIDDEN), "model.norm.weight": 1 + w(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": w(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": w(FFN, HIDDEN),
            p + "mlp.up_proj.weight": w(FFN, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, FFN),
            p + "input_layernorm.weight": 1 + w(HIDDEN),
            p + "post_attention_layernorm.weight": 1 + w(HIDDEN),
        }
    if not tied:
        weights["lm_head.weight"] = w(vocab, HIDDEN)
    return weights


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
# Storage types of the tiny model: most F32, some Q8_0, one F16.
QUANTIZED = {"token_embd.weight", "output.weight"} | {
    f"blk.1.{n}.weight" for n in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
}
HALF = {"blk.0.attn_v.weight"}


def gguf_name(hf_name: str) -> str:
    """The llama.cpp tensor name of an HF llama parameter."""
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, module = hf_name.removesuffix(".weight").split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[module]}.weight"


def write_tiny_gguf(
    path: str,
    tied: bool = True,
    arch: str = "llama",
    tokenizer_model: str = "gpt2",
    overrides: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Writes a tiny llama GGUF the way llama.cpp's converter does; returns its HF weights."""
    tokens, merges, types = train_vocab()
    weights = hf_weights(len(tokens), tied)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny test llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for hf_name, weight in weights.items():
        name = gguf_name(hf_name)
        if ".self_attn.q_proj." in hf_name:
            weight = llama_cpp_permute(weight, HEADS)
        elif ".self_attn.k_proj." in hf_name:
            weight = llama_cpp_permute(weight, KV_HEADS)
        if overrides and name in overrides:
            writer.add_tensor(name, overrides[name])
        elif name in QUANTIZED:
            q8 = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif name in HALF:
            writer.add_tensor(name, weight.astype(np.float16))
        else:
            writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.fixture(scope="module", params=["tied", "untied"])
def tiny(request, tmp_path_factory):
    """(gguf dir, gguf file name, converted dir, original HF weights)."""
    root = tmp_path_factory.mktemp(f"tiny_{request.param}")
    gguf_dir = root / "gguf"
    gguf_dir.mkdir()
    weights = write_tiny_gguf(str(gguf_dir / "tiny.gguf"), tied=request.param == "tied")
    out = gguf_to_hf_dir(str(gguf_dir / "tiny.gguf"), str(root / "hf"))
    return str(gguf_dir), "tiny.gguf", out, weights


@pytest.fixture(scope="module")
def reference_model(tiny):
    """transformers' own GGUF loading of the tiny file."""
    from transformers import AutoModelForCausalLM

    gguf_dir, name, _, _ = tiny
    return AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name).eval()


def test_tensors_equal_transformers_gguf_loader(tiny, reference_model):
    _, _, out, _ = tiny
    ours = load_file(os.path.join(out, "model.safetensors"))
    reference = {k: v.numpy() for k, v in reference_model.state_dict().items()}
    tied = "lm_head.weight" not in ours
    # transformers lists the tied head as its own entry; the checkpoint rightly omits it.
    assert set(reference) - set(ours) == ({"lm_head.weight"} if tied else set())
    assert set(ours) <= set(reference)
    for name, array in ours.items():
        assert array.dtype == np.float32, name
        np.testing.assert_array_equal(array, reference[name], err_msg=name)


def test_tensors_equal_original_weights(tiny):
    """Independent of transformers: F32/F16 tensors round-trip exactly, Q8_0 to its precision."""
    _, _, out, weights = tiny
    ours = load_file(os.path.join(out, "model.safetensors"))
    assert set(ours) == set(weights)
    for name, original in weights.items():
        stored = gguf_name(name)
        if stored in QUANTIZED:
            # Q8_0: 32-value blocks, int8 steps of max|block|/127.
            np.testing.assert_allclose(ours[name], original, atol=np.abs(original).max() / 127)
        elif stored in HALF:
            np.testing.assert_array_equal(ours[name], original.astype(np.float16).astype(np.float32))
        else:
            np.testing.assert_array_equal(ours[name], original, err_msg=name)


def test_transformers_loads_converted_dir(tiny, reference_model):
    import torch
    from transformers import AutoModelForCausalLM

    _, _, out, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ref_config, config = reference_model.config, model.config
    for key in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
        "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    ):
        assert getattr(config, key) == getattr(ref_config, key), key
    assert config.rope_parameters["rope_theta"] == ref_config.rope_parameters["rope_theta"] == 50000.0
    reference = reference_model.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)
    ids = torch.tensor([[1, 5, 17, 42, 99, 200, 3, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_model(ids).logits)


def test_tokenizer_matches_transformers(tiny):
    from transformers import AutoTokenizer

    gguf_dir, name, out, _ = tiny
    ours = AutoTokenizer.from_pretrained(out)
    reference = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    assert ours.get_vocab() == reference.get_vocab()
    assert len(ours) == len(reference)
    assert ours.special_tokens_map == reference.special_tokens_map
    assert ours.all_special_ids == reference.all_special_ids
    for text in TEXTS:
        ids = ours(text).input_ids
        assert ids == reference(text).input_ids, text
        assert ours.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
        assert ours.decode(ids) == reference.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    # The special and user-defined tokens stay whole; the mislabelled one is cut into pieces.
    assert ours("<|im_start|><think>").input_ids == [1, ours.convert_tokens_to_ids("<think>")]
    assert len(ours("<|bad token|>").input_ids) > 1
    for messages in MESSAGES:
        text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
        assert ours(text).input_ids == reference(text).input_ids


def test_written_files(tiny):
    _, _, out, _ = tiny
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["head_dim"], config["num_key_value_heads"], config["rope_theta"]) == (HEAD_DIM, KV_HEADS, 50000.0)
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        tokenizer_config = json.load(f)
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    # Nothing but the finished directory is left beside it.
    assert sorted(os.listdir(os.path.dirname(out))) == ["gguf", "hf"]


def test_bfloat16_output(tiny, tmp_path):
    import ml_dtypes

    gguf_dir, name, out, _ = tiny
    half = gguf_to_hf_dir(os.path.join(gguf_dir, name), str(tmp_path / "bf16"), dtype="bfloat16")
    full = load_file(os.path.join(out, "model.safetensors"))
    for key, array in load_file(os.path.join(half, "model.safetensors")).items():
        assert array.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(array, full[key].astype(ml_dtypes.bfloat16))
    with pytest.raises(UnsupportedDtypeError, match="int8"):
        gguf_to_hf_dir(os.path.join(gguf_dir, name), str(tmp_path / "bad"), dtype="int8")


def test_conversion_does_not_import_torch(tiny, tmp_path):
    gguf_dir, name, _, _ = tiny
    code = (
        "import sys\n"
        "from harmjax.io.gguf import gguf_to_hf_dir\n"
        f"gguf_to_hf_dir({os.path.join(gguf_dir, name)!r}, {str(tmp_path / 'out')!r})\n"
        "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')], 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_replaces_earlier_output_but_not_other_dirs(tiny, tmp_path):
    gguf_dir, name, _, _ = tiny
    path = os.path.join(gguf_dir, name)
    out = tmp_path / "out"
    gguf_to_hf_dir(path, str(out))
    (out / "stale.txt").write_text("from an earlier run")
    gguf_to_hf_dir(path, str(out))
    assert not (out / "stale.txt").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        gguf_to_hf_dir(path, str(other))
    assert os.listdir(other) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["other", "out"]


# ----------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(MissingFileError, match="nope.gguf"):
        gguf_to_hf_dir(missing, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all\n" * 100, b"GGUF\x03\x00\x00\x00"])
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "fake.gguf"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="fake.gguf"):
        gguf_to_hf_dir(str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.3, 0.99])
def test_truncated_gguf(tmp_path, keep):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(str(path))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated"):
        gguf_to_hf_dir(str(path), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["tiny.gguf"]


def test_non_llama_architecture(tmp_path):
    path = tmp_path / "qwen.gguf"
    write_tiny_gguf(str(path), arch="qwen2")
    with pytest.raises(UnsupportedArchitectureError, match=r"'qwen2'.*\['llama'\]"):
        gguf_to_hf_dir(str(path), str(tmp_path / "out"))


def test_sentencepiece_tokenizer_not_supported(tmp_path):
    path = tmp_path / "spm.gguf"
    write_tiny_gguf(str(path), tokenizer_model="llama")
    with pytest.raises(CheckpointError, match="sentencepiece.*not supported yet"):
        gguf_to_hf_dir(str(path), str(tmp_path / "out"))


def test_unsupported_tensor_type_leaves_nothing(tmp_path):
    path = tmp_path / "f64.gguf"
    # The last layer's down projection stored as F64, which gguf cannot dequantize.
    down = np.zeros((HIDDEN, FFN), dtype=np.float64)
    write_tiny_gguf(str(path), overrides={"blk.1.ffn_down.weight": down})
    with pytest.raises(CheckpointError, match=r"'blk\.1\.ffn_down\.weight'.*F64"):
        gguf_to_hf_dir(str(path), str(tmp_path / "out"))
    # The failed conversion removed its partial output.
    assert sorted(os.listdir(tmp_path)) == ["f64.gguf"]


def test_too_small_disk_fails_before_writing(tiny, tmp_path, monkeypatch):
    """A conversion that cannot fit fails at once, names the bytes, and touches nothing."""
    import shutil

    from harmjax.io import disk_space

    gguf_dir, name, out, _ = tiny
    size = os.path.getsize(os.path.join(out, "model.safetensors"))
    target = tmp_path / "hf"
    gguf_to_hf_dir(os.path.join(gguf_dir, name), str(target))  # an earlier, complete conversion
    before = {f: os.path.getmtime(target / f) for f in os.listdir(target)}
    real = shutil.disk_usage
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda p: real(p)._replace(free=size // 2))
    with pytest.raises(DiskSpaceError, match=r"Converting .*tiny\.gguf needs about .* in .*, but its disk has only") as e:
        gguf_to_hf_dir(os.path.join(gguf_dir, name), str(target))
    assert isinstance(e.value, OSError) and "$HARMJAX_CACHE" in str(e.value)
    assert {f: os.path.getmtime(target / f) for f in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no partial directory left behind
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda p: real(p)._replace(free=2 * size))
    gguf_to_hf_dir(os.path.join(gguf_dir, name), str(target))
