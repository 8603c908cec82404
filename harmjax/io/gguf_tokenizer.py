"""A llama.cpp GGUF file's tokenizer as a transformers `PreTrainedTokenizerFast`, built with
the `tokenizers` library the way transformers' own GGUF loader builds it (byte-level BPE
vocabularies only). Part of `harmjax.io.gguf`'s conversion."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from harmjax.errors import CheckpointError
from harmjax.io.gguf_read import require_key, token_id

# llama.cpp's token types (llama_token_type in llama.h).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

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
    tokens = list(require_key(metadata, "tokenizer.ggml.tokens", gguf_path))
    merges = require_key(metadata, "tokenizer.ggml.merges", gguf_path)
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
        index = token_id(metadata, key)
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
