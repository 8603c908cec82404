"""A llama GGUF file in Hugging Face terms: its tensor names mapped to HF Llama parameter
names, its dimensions checked against `param_specs` (the table every loader checks
against), its tensors streamed in HF layout, and its metadata as a transformers LlamaConfig
dict. Part of `harmjax.io.gguf`'s conversion."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from gguf import GGUFReader
from tqdm.auto import tqdm

from harmjax.config import ModelConfig
from harmjax.errors import CheckpointError, UnsupportedArchitectureError
from harmjax.io.gguf_read import dequantize_tensor, require_key, token_id, unpermute_rows
from harmjax.model.param_specs import param_specs

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF per-layer tensor name -> Hugging Face Llama module path under `model.layers.N.`.
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama parameter name for a GGUF tensor name, or None if it has none."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}.weight"
    return None


def llama_shape(metadata: Mapping[str, Any], reader: GGUFReader, gguf_path: str) -> ModelConfig:
    """Reads and checks the model dimensions (as a ModelConfig, whose `param_specs` name and
    shape every tensor); rejects what a plain Llama config cannot express."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{gguf_path} holds a {arch!r} model (general.architecture); gguf_to_hf_dir converts "
            f"only {list(SUPPORTED_ARCHITECTURES)}. Use a Hugging Face checkpoint of this model instead."
        )
    key = lambda name: require_key(metadata, f"llama.{name}", gguf_path)  # noqa: E731
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    # Per-layer head counts (a list) describe hybrid models a Llama config cannot express.
    kv_heads = metadata.get("llama.attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise UnsupportedArchitectureError(
            f"{gguf_path} gives per-layer head counts; only uniform llama layers are supported."
        )
    head_dim = int(metadata.get("llama.attention.key_length", hidden // heads))
    rotary_dim = metadata.get("llama.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise UnsupportedArchitectureError(
            f"{gguf_path} rotates only {rotary_dim} of {head_dim} head dimensions "
            "(llama.rope.dimension_count); partial rotary embeddings are not supported."
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = metadata.get("llama.vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        raise CheckpointError(
            f"{gguf_path} states no vocabulary size (llama.vocab_size or tokenizer.ggml.tokens)."
        )
    # The decoder's own config describes the file, so the expected tensor names and shapes
    # come from param_specs, the same table every other loader checks against.
    shape = ModelConfig(
        model_type="llama",
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=head_dim,
    )
    _check_tensor_table(reader, shape, gguf_path)
    return shape


def _check_tensor_table(reader: GGUFReader, shape: ModelConfig, gguf_path: str) -> None:
    """Every tensor must map to a Llama parameter of the stated shape, and none may be missing."""
    specs = param_specs(shape)
    found: dict[str, str] = {}
    unknown = []
    for tensor in reader.tensors:
        hf_name = hf_tensor_name(tensor.name)
        if hf_name is None:
            unknown.append(tensor.name)
            continue
        found[hf_name] = tensor.name
        # ggml lists dimensions fastest-moving first; NumPy/HF order is the reverse.
        stored = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        expected = specs[hf_name].shape
        if stored != expected:
            raise CheckpointError(
                f"Tensor {tensor.name!r} in {gguf_path} has shape {stored}, but the metadata implies "
                f"{expected} for {hf_name}. The file is inconsistent."
            )
    if unknown:
        # Dropping them silently would give a different model (e.g. Llama 3.1's rope_freqs).
        raise UnsupportedArchitectureError(
            f"{gguf_path} holds tensors a plain Llama model has no place for: {unknown[:8]}"
            f"{' ...' if len(unknown) > 8 else ''}. This llama variant is not supported."
        )
    missing = [name for name in specs if name not in found]
    if missing:
        raise CheckpointError(
            f"{gguf_path} lacks {len(missing)} tensors of a {shape.num_layers}-layer llama model, "
            f"e.g. {missing[:4]}. The file is incomplete; download it again."
        )


def hf_tensors(
    reader: GGUFReader, shape: ModelConfig, np_dtype: np.dtype, gguf_path: str
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (hf_name, array) one tensor at a time, so write_tensors can stream them to disk.

    F32 tensors stay views of the memory-mapped file; nothing builds a second copy of the model.
    """
    specs = param_specs(shape)
    for tensor in tqdm(reader.tensors, desc=f"Converting {os.path.basename(gguf_path)}", unit="tensor"):
        hf_name = hf_tensor_name(tensor.name)
        array = dequantize_tensor(tensor, gguf_path).reshape(specs[hf_name].shape)
        if ".self_attn.q_proj." in hf_name:
            array = unpermute_rows(array, shape.num_heads)
        elif ".self_attn.k_proj." in hf_name:
            array = unpermute_rows(array, shape.num_kv_heads)
        yield hf_name, array.astype(np_dtype, copy=False)


def _rope_parameters(metadata: Mapping[str, Any], gguf_path: str) -> dict[str, Any]:
    theta = float(metadata.get("llama.rope.freq_base", 10000.0))
    scaling = metadata.get("llama.rope.scaling.type", "none")
    if scaling == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":
        factor = float(require_key(metadata, "llama.rope.scaling.factor", gguf_path))
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    raise UnsupportedArchitectureError(
        f"{gguf_path} uses rope scaling {scaling!r} (llama.rope.scaling.type); only 'none' "
        "and 'linear' are supported."
    )


def hf_config(
    metadata: Mapping[str, Any], shape: ModelConfig, dtype: str, gguf_path: str
) -> dict[str, Any]:
    """A transformers LlamaConfig dict; every dimension stated explicitly, not left to defaults."""
    rope = _rope_parameters(metadata, gguf_path)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(metadata.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        # transformers >= 5 reads rope_parameters; older versions and simple readers rope_theta.
        "rope_theta": rope["rope_theta"],
        "rope_parameters": rope,
        "max_position_embeddings": int(metadata.get("llama.context_length", 2048)),
        "vocab_size": shape.vocab_size,
        # llama.cpp omits output.weight exactly when the head shares the embedding matrix.
        "tie_word_embeddings": shape.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": token_id(metadata, "bos_token_id"),
        "eos_token_id": token_id(metadata, "eos_token_id"),
        "pad_token_id": token_id(metadata, "padding_token_id"),
        "unk_token_id": token_id(metadata, "unknown_token_id"),
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }
    if rope["rope_type"] != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if name := metadata.get("general.name"):
        config["_name_or_path"] = name
    return config


def generation_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """generation_config.json's contents: the special token ids of an `hf_config` dict."""
    return {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
