"""Converting a llama.cpp GGUF file into an ordinary Hugging Face checkpoint directory.

A GGUF file carries everything a Hugging Face checkpoint does (weights, config, tokenizer, chat
template) but in llama.cpp's layout: quantized blocks, its own tensor and metadata names, and
Q/K projection rows permuted for its rotary kernel. `gguf_to_hf_dir` undoes all of that with
NumPy and the `gguf`, `tokenizers` and `transformers` tokenizer libraries -- never torch -- and
writes `config.json`, `model.safetensors`, the tokenizer files and `generation_config.json`.

The output matches what transformers' own (torch-requiring) GGUF loader builds from the same
file: the same dequantized float32 tensors and a tokenizer that yields the same ids.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tqdm.auto import tqdm

from harmjax.config import ModelConfig
from harmjax.errors import (
    CheckpointError,
    MissingFileError,
    UnsupportedArchitectureError,
    UnsupportedDtypeError,
)
from harmjax.io.disk_space import require_free_space
from harmjax.io.safetensors_io import write_tensors
from harmjax.model.param_specs import param_specs

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)

# Written into every converted directory; lets a caller (harmjax.assets) tell a complete,
# current conversion from a stale one without re-reading the weights.
CONVERSION_FILE = "harmjax_conversion.json"
# Bump when the output of a conversion changes, so cached conversions are redone.
CONVERTER_VERSION = 1

_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}

# llama.cpp's token types (llama_token_type in llama.h).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

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


def gguf_to_hf_dir(gguf_path: str, out_dir: str, dtype: str = "float32") -> str:
    """Converts a llama.cpp GGUF file into a Hugging Face checkpoint directory; returns its path.

    Writes `config.json`, `model.safetensors` (every tensor dequantized, then cast to `dtype`:
    "float32", "float16" or "bfloat16"), `tokenizer.json`, `tokenizer_config.json` (with the
    file's chat template), `generation_config.json` and `harmjax_conversion.json`.

    Everything is written to a temporary sibling directory that is renamed onto `out_dir` only
    when complete, so an interrupted conversion never leaves a half-written `out_dir`. An existing
    `out_dir` is replaced if it is empty or an earlier output of this function; any other
    existing directory is left alone and CheckpointError is raised.

    Raises MissingFileError (no such file), CheckpointError (not a GGUF file, truncated,
    unsupported quantization type or tokenizer, inconsistent shapes) and
    UnsupportedArchitectureError (not a llama model).
    """
    np_dtype = _numpy_dtype(dtype)
    reader = open_gguf(gguf_path)
    metadata = read_metadata(reader, gguf_path)
    shape = _llama_shape(metadata, reader, gguf_path)
    # Everything that can fail on metadata alone fails here, before minutes of dequantizing.
    config = _hf_config(metadata, shape, dtype, gguf_path)
    tokenizer = build_tokenizer(metadata, gguf_path)
    out_dir = os.path.abspath(out_dir)
    _check_replaceable(out_dir)
    require_free_space(
        os.path.dirname(out_dir), _converted_bytes(reader, np_dtype), f"Converting {gguf_path}",
        "Free some space, or convert to another directory (for harmjax's cache: set $HARMJAX_CACHE).",
    )

    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    # mkdtemp makes the directory private (0700); a checkpoint gets the usual permissions.
    os.chmod(tmp, 0o755)
    try:
        write_tensors(tmp, _hf_tensors(reader, shape, np_dtype, gguf_path))
        _write_json(os.path.join(tmp, "config.json"), config)
        _write_json(os.path.join(tmp, "generation_config.json"), _generation_config(config))
        _save_tokenizer(tokenizer, tmp)
        _write_json(os.path.join(tmp, CONVERSION_FILE), _conversion_record(gguf_path, dtype))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Converted %s to %s (%s).", gguf_path, out_dir, dtype)
    return out_dir


def _converted_bytes(reader: GGUFReader, np_dtype: np.dtype) -> int:
    """Bytes of model.safetensors once every tensor harmjax keeps is dequantized to `np_dtype`."""
    return sum(
        int(t.n_elements) * np.dtype(np_dtype).itemsize
        for t in reader.tensors
        if hf_tensor_name(t.name) is not None
    )


def open_gguf(gguf_path: str) -> GGUFReader:
    """Opens a GGUF file (memory-mapped), raising MissingFileError or CheckpointError."""
    if not os.path.isfile(gguf_path):
        raise MissingFileError(
            f"GGUF file {gguf_path} does not exist. Check the path, or download the .gguf file."
        )
    try:
        return GGUFReader(gguf_path)
    except Exception as e:  # gguf raises ValueError, IndexError, OSError... on a bad file.
        size = os.path.getsize(gguf_path)
        raise CheckpointError(
            f"Cannot read {gguf_path} ({size} bytes) as a GGUF file: {e}. The file is not a "
            "GGUF file or is truncated; download it again."
        ) from e


def read_metadata(reader: GGUFReader, gguf_path: str) -> dict[str, Any]:
    """The GGUF key/value metadata as plain Python values (str, int, float, bool, list)."""
    try:
        return {
            key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")
        }
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"Cannot decode the metadata of {gguf_path}: {e}. The file is corrupt; download it again."
        ) from e


def _numpy_dtype(dtype: str) -> np.dtype:
    if dtype not in _DTYPES:
        raise UnsupportedDtypeError(
            f"Cannot write a converted checkpoint as {dtype!r}; choose one of {sorted(_DTYPES)}."
        )
    return np.dtype(_DTYPES[dtype])


def _require(metadata: Mapping[str, Any], key: str, gguf_path: str) -> Any:
    if key not in metadata:
        raise CheckpointError(
            f"{gguf_path} has no metadata key {key!r}, which a llama model needs. The file is "
            "incomplete; re-export it with a current llama.cpp convert_hf_to_gguf.py."
        )
    return metadata[key]


def _llama_shape(metadata: Mapping[str, Any], reader: GGUFReader, gguf_path: str) -> ModelConfig:
    """Reads and checks the model dimensions; rejects what a plain Llama config cannot express."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{gguf_path} holds a {arch!r} model (general.architecture); gguf_to_hf_dir converts "
            f"only {list(SUPPORTED_ARCHITECTURES)}. Use a Hugging Face checkpoint of this model instead."
        )
    key = lambda name: _require(metadata, f"llama.{name}", gguf_path)  # noqa: E731
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


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama parameter name for a GGUF tensor name, or None if it has none."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}.weight"
    return None


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


def _hf_tensors(
    reader: GGUFReader, shape: ModelConfig, np_dtype: np.dtype, gguf_path: str
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (hf_name, array) one tensor at a time, so write_tensors can stream them to disk.

    F32 tensors stay views of the memory-mapped file; nothing builds a second copy of the model.
    """
    specs = param_specs(shape)
    for tensor in tqdm(reader.tensors, desc=f"Converting {os.path.basename(gguf_path)}", unit="tensor"):
        hf_name = hf_tensor_name(tensor.name)
        array = _dequantize(tensor, gguf_path).reshape(specs[hf_name].shape)
        if ".self_attn.q_proj." in hf_name:
            array = unpermute_rows(array, shape.num_heads)
        elif ".self_attn.k_proj." in hf_name:
            array = unpermute_rows(array, shape.num_kv_heads)
        yield hf_name, array.astype(np_dtype, copy=False)


def _dequantize(tensor: Any, gguf_path: str) -> np.ndarray:
    """The tensor as float32 in NumPy (HF) dimension order."""
    type_name = GGMLQuantizationType(tensor.tensor_type).name
    try:
        array = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(
            f"Tensor {tensor.name!r} in {gguf_path} is stored as {type_name}, which the gguf "
            "library cannot dequantize. Use a GGUF quantized to a common type (F32, F16, BF16, "
            "Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)."
        ) from e
    except Exception as e:
        raise CheckpointError(
            f"Cannot dequantize tensor {tensor.name!r} ({type_name}) in {gguf_path}: {e}. "
            "The file is truncated or corrupt; download it again."
        ) from e
    return np.asarray(array, dtype=np.float32)


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (convert_hf_to_gguf.py `LlamaModel.permute`).

    llama.cpp interleaves the two rotary halves of each head, row-wise; Hugging Face keeps them
    as two contiguous halves. Rows are viewed as (heads, 2 halves interleaved, head_dim / 2) and
    the middle axes swapped back.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    grouped = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def _rope_parameters(metadata: Mapping[str, Any], gguf_path: str) -> dict[str, Any]:
    theta = float(metadata.get("llama.rope.freq_base", 10000.0))
    scaling = metadata.get("llama.rope.scaling.type", "none")
    if scaling == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":
        factor = float(_require(metadata, "llama.rope.scaling.factor", gguf_path))
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    raise UnsupportedArchitectureError(
        f"{gguf_path} uses rope scaling {scaling!r} (llama.rope.scaling.type); only 'none' "
        "and 'linear' are supported."
    )


def _token_id(metadata: Mapping[str, Any], key: str) -> int | None:
    value = metadata.get(f"tokenizer.ggml.{key}")
    return None if value is None else int(value)


def _hf_config(
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
        "bos_token_id": _token_id(metadata, "bos_token_id"),
        "eos_token_id": _token_id(metadata, "eos_token_id"),
        "pad_token_id": _token_id(metadata, "padding_token_id"),
        "unk_token_id": _token_id(metadata, "unknown_token_id"),
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }
    if rope["rope_type"] != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if name := metadata.get("general.name"):
        config["_name_or_path"] = name
    return config


def _generation_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _conversion_record(gguf_path: str, dtype: str) -> dict[str, Any]:
    return {
        "converter_version": CONVERTER_VERSION,
        "source_file": os.path.basename(gguf_path),
        "source_bytes": os.path.getsize(gguf_path),
        "dtype": dtype,
    }


def _save_tokenizer(tokenizer: Any, directory: str) -> None:
    # The chat template goes into tokenizer_config.json (not only chat_template.jinja), where
    # every transformers version and simple readers look for it.
    tokenizer.save_pretrained(directory, save_jinja_files=False)
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    # transformers 5 writes "TokenizersBackend", a class 4.x lacks; it reads this name as the same.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(path, config)


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def _check_replaceable(out_dir: str) -> None:
    """Refuses to replace anything but an empty directory or an earlier conversion."""
    if not os.path.exists(out_dir):
        return
    if os.path.isdir(out_dir) and (
        not os.listdir(out_dir) or os.path.isfile(os.path.join(out_dir, CONVERSION_FILE))
    ):
        return
    raise CheckpointError(
        f"{out_dir} already exists and is not an earlier gguf_to_hf_dir output; refusing to "
        "replace it. Pass a new or empty output directory."
    )


def _replace_dir(tmp: str, out_dir: str) -> None:
    """Moves the finished `tmp` onto `out_dir`, keeping the old one until the new one is in place."""
    if not os.path.exists(out_dir):
        os.replace(tmp, out_dir)
        return
    trash = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
    old = os.path.join(trash, "old")
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

# Pre-tokenizer split patterns for the `tokenizer.ggml.pre` values transformers knows
# (transformers/integrations/gguf/gguf_tokenizer_mapping.py, GGUF_PRE_TOKENIZER_SPLITS). Any other
# value (e.g. SmolLM2's "smollm") keeps the GPT-2 split of the plain ByteLevel pre-tokenizer.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
         "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"],
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level vocabularies are spelled."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(metadata: Mapping[str, Any], gguf_path: str) -> Any:
    """A `transformers.PreTrainedTokenizerFast` equivalent to the GGUF file's tokenizer.

    Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are supported. The result
    tokenizes exactly as `AutoTokenizer.from_pretrained(..., gguf_file=...)` does.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        detail = {
            None: "has no tokenizer (tokenizer.ggml.model is missing)",
            "llama": "has a sentencepiece ('llama') tokenizer, which is not supported yet",
        }.get(kind, f"has a {kind!r} tokenizer, which is not supported")
        raise CheckpointError(
            f"{gguf_path} {detail}; only byte-level BPE ('gpt2') GGUF tokenizers are converted. "
            "Use a Hugging Face checkpoint of this model instead."
        )
    tokens = list(_require(metadata, "tokenizer.ggml.tokens", gguf_path))
    merges = _require(metadata, "tokenizer.ggml.merges", gguf_path)
    # Files without token types treat every token as a normal one.
    token_types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(token_types) != len(tokens):
        raise CheckpointError(
            f"{gguf_path} lists {len(tokens)} tokens but {len(token_types)} token types. The file is corrupt."
        )
    backend = _byte_level_backend(tokens, merges, metadata.get("tokenizer.ggml.pre"))
    _add_special_tokens(backend, tokens, token_types)
    return _wrap_tokenizer(backend, tokens, metadata, gguf_path)


def _byte_level_backend(tokens: list[str], merges: list[str], pre: str | None) -> Tokenizer:
    """A `tokenizers` byte-level BPE, built as transformers' `byte_level_tokenizer` builds it."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token using characters outside the byte alphabet (a literal space, say) is respelled in
    # it, byte by byte; otherwise the BPE model could never produce it.
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    pairs = [tuple(merge.split(" ")) for merge in merges]
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=pairs,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    # tokenizer.ggml.add_space_prefix is deliberately ignored: llama.cpp applies it only to
    # sentencepiece vocabularies, and transformers' GGUF loader ignores it for BPE too.
    split = _PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_special_tokens(backend: Tokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Registers CONTROL tokens as special and USER_DEFINED ones as plain added tokens.

    Either kind must be matched whole in the text, as llama.cpp does, instead of being cut into
    BPE pieces. A CONTROL token spelled outside the byte alphabet is a llama.cpp mislabel and is
    skipped (as transformers does), since adding it would grow the vocabulary past the model's.
    """
    alphabet = set(bytes_to_unicode().values())
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types, strict=True)
        if kind == _TOKEN_CONTROL and set(token) <= alphabet
    ]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab(with_added_tokens=True)
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types, strict=True)
        if kind == _TOKEN_USER_DEFINED and token in vocab
    ]
    if user_defined:
        backend.add_tokens(user_defined)


def _wrap_tokenizer(
    backend: Tokenizer, tokens: list[str], metadata: Mapping[str, Any], gguf_path: str
) -> Any:
    # Imported here: transformers is slow to import and only this step needs it.
    from transformers import PreTrainedTokenizerFast

    def token(key: str) -> str | None:
        index = _token_id(metadata, key)
        if index is None:
            return None
        if not 0 <= index < len(tokens):
            raise CheckpointError(
                f"{gguf_path} names token id {index} as tokenizer.ggml.{key}, but the vocabulary "
                f"has only {len(tokens)} tokens. The file is corrupt."
            )
        return tokens[index]

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=metadata.get("tokenizer.chat_template"),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
    )
