"""Prompt formatting for generation: the chat template, and the prefilling attack's prefix.

The prefilling attack starts the assistant turn with a given prefix, typically the first
10 tokens of a harmful reference response. The model input is
`chat_template(user=prompt, add_generation_prompt=True) + prefix`; the prefix is tokenized
on its own and appended, so its tokens are exactly the reference response's first tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from harmjax.errors import HarmjaxError


class PromptFormatError(HarmjaxError, ValueError):
    """A prompt cannot be formatted (no chat template, empty prompt, ...)."""


def prompt_token_ids(tokenizer, prompt: str, *, chat: bool = True, system: str | None = None) -> list[int]:
    """Token ids of one prompt up to where the model's answer starts.

    chat=True applies the tokenizer's chat template with a generation prompt (the template
    writes any BOS itself); chat=False encodes the raw text with the tokenizer's special
    tokens (BOS where the tokenizer adds one).
    """
    if not isinstance(prompt, str):
        raise PromptFormatError(f"Prompt must be a string, got {type(prompt).__name__}: {prompt!r:.80}")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise PromptFormatError(
                f"The tokenizer {type(tokenizer).__name__} has no chat template; pass chat=False "
                "to generate from raw text."
            )
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def prefix_token_ids(tokenizer, prefix: str | None) -> list[int]:
    """Token ids of an assistant-turn prefix (no special tokens); [] for None or ""."""
    if not prefix:
        return []
    return list(tokenizer(prefix, add_special_tokens=False)["input_ids"])


def response_prefix(tokenizer, response: str, n_tokens: int = 10) -> str:
    """The text of the first `n_tokens` tokens of a reference response (the attack's prefix)."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True)


def build_inputs(
    tokenizer,
    prompts: Sequence[str],
    prefixes: Sequence[str | None] | None = None,
    *,
    chat: bool = True,
    system: str | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Model inputs (prompt ids + prefix ids) and the prefix ids alone, one per prompt."""
    if prefixes is not None and len(prefixes) != len(prompts):
        raise PromptFormatError(f"{len(prefixes)} prefixes for {len(prompts)} prompts; give one per prompt.")
    inputs, prefix_ids = [], []
    for i, prompt in enumerate(prompts):
        ids = prompt_token_ids(tokenizer, prompt, chat=chat, system=system)
        pre = prefix_token_ids(tokenizer, prefixes[i] if prefixes is not None else None)
        if not ids and not pre:
            raise PromptFormatError(f"Prompt {i} encodes to no tokens: {prompt!r:.80}")
        inputs.append(ids + pre)
        prefix_ids.append(pre)
    return inputs, prefix_ids


def continuation_text(tokenizer, prefix_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text the new tokens add after the prefix.

    Decoded together with the prefix and the prefix's own text cut off, so tokenizers whose
    decode strips or merges at boundaries (SentencePiece's leading space) give
    `prefix_text + continuation == decode(prefix + new)`.
    """
    if not prefix_ids:
        return tokenizer.decode(list(new_ids), skip_special_tokens=True)
    full = tokenizer.decode(list(prefix_ids) + list(new_ids), skip_special_tokens=True)
    head = tokenizer.decode(list(prefix_ids), skip_special_tokens=True)
    if full.startswith(head):
        return full[len(head):]
    return tokenizer.decode(list(new_ids), skip_special_tokens=True)
