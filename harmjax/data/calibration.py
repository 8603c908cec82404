"""Calibration batches for attribution: tokenized (prompt, response) pairs with a response-only
loss mask, padded into a few length buckets so XLA compiles a handful of shapes.

Text formats:
  raw:  `prompt + "\\n" + response`, tokenized with the tokenizer's special tokens (BOS): what
        the reference implementation scores.
  chat: the model's chat template with one user turn and one assistant turn; the loss covers
        the assistant's content and the template's end-of-turn tokens.

The loss mask marks response tokens, found from character offsets (fast tokenizers), so a BPE
merge across the prompt/response boundary cannot shift it. Truncation to `max_length` drops
prompt tokens from the left (keeping a leading BOS) and only then the end of the response,
so the tokens being scored survive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from harmjax.data.records import DatasetFormatError, Example

TEXT_FORMATS = ("raw", "chat")


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """One example's token ids and its 0/1 loss mask over those ids (1 = response token)."""

    ids: np.ndarray
    loss_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class Batch:
    """A padded micro-batch: (batch, length) int32 arrays plus the example indices it holds
    (-1 for filler rows, whose masks are all zero)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    index: np.ndarray

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens in the batch."""
        return int(self.attention_mask.sum())


def format_example(tokenizer, example: Example, text_format: str = "raw") -> tuple[str, str]:
    """(prompt_text, full_text) of an example; `full_text` starts with `prompt_text`."""
    if text_format == "raw":
        prompt_text = example.prompt + "\n"
        return prompt_text, prompt_text + example.response
    if text_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("text_format='chat' needs a tokenizer with a chat template; this one has none.")
        user = [{"role": "user", "content": example.prompt}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": example.response}], tokenize=False
        )
        if not full.startswith(prompt_text):
            # Templates that rewrite earlier turns: score the generation prompt + raw response.
            full = prompt_text + example.response
        return prompt_text, full
    raise ValueError(f"text_format must be one of {TEXT_FORMATS}, got {text_format!r}.")


def _encode(tokenizer, prompt_text: str, full_text: str, add_special: bool) -> tuple[list[int], list[int]]:
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full_text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        boundary = len(prompt_text)
        # A token belongs to the response when it ends after the prompt; special tokens
        # (offset (0, 0)) added in front belong to the prompt.
        mask = [int(end > boundary) for _, end in enc["offset_mapping"]]
        return ids, mask
    ids = tokenizer(full_text, add_special_tokens=add_special)["input_ids"]
    n_prompt = len(tokenizer(prompt_text, add_special_tokens=add_special)["input_ids"])
    return list(ids), [0] * n_prompt + [1] * (len(ids) - n_prompt)


def tokenize_example(
    tokenizer, example: Example, text_format: str = "raw", max_length: int = 256
) -> Tokenized:
    """Token ids and response-only loss mask of one example, truncated to `max_length`."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}.")
    prompt_text, full_text = format_example(tokenizer, example, text_format)
    ids, mask = _encode(tokenizer, prompt_text, full_text, add_special=text_format == "raw")
    if not any(mask):
        raise DatasetFormatError(
            f"Example {example.id!r}: the response tokenizes to nothing, so it cannot be scored."
        )
    first = mask.index(1)
    prompt_ids, resp_ids = ids[:first], ids[first:]
    resp_mask = mask[first:]
    if len(ids) > max_length:
        keep_resp = min(len(resp_ids), max_length - 1)  # >= 1 context token before the response
        keep_prompt = max_length - keep_resp
        bos = tokenizer.bos_token_id
        if keep_prompt >= 2 and prompt_ids and prompt_ids[0] == bos and len(prompt_ids) > keep_prompt:
            prompt_ids = [bos] + prompt_ids[len(prompt_ids) - keep_prompt + 1 :]
        else:
            prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :] if keep_prompt else []
        resp_ids, resp_mask = resp_ids[:keep_resp], resp_mask[:keep_resp]
    ids = prompt_ids + resp_ids
    loss = [0] * len(prompt_ids) + resp_mask
    return Tokenized(np.asarray(ids, np.int32), np.asarray(loss, np.int32))


def tokenize_examples(
    tokenizer, examples: Sequence[Example], text_format: str = "raw", max_length: int = 256
) -> list[Tokenized]:
    """`tokenize_example` over a list (same order)."""
    return [tokenize_example(tokenizer, ex, text_format, max_length) for ex in examples]


def bucket_lengths(max_length: int, minimum: int = 32, num_buckets: int = 4) -> list[int]:
    """A few padded lengths: halvings of max_length down to `minimum` (ascending)."""
    out = [max_length]
    while len(out) < num_buckets and out[-1] // 2 >= minimum:
        out.append(out[-1] // 2)
    return sorted(out)


def make_batches(
    tokenized: Sequence[Tokenized],
    batch_size: int,
    pad_id: int,
    buckets: Sequence[int],
) -> list[Batch]:
    """Groups examples by the smallest bucket that holds them and pads each group into batches
    of exactly `batch_size` rows (right padding; filler rows all-masked).

    The order is deterministic (bucket, then input order), so a batch index is a stable
    position for resuming a scan.
    """
    buckets = sorted(buckets)
    groups: dict[int, list[int]] = {b: [] for b in buckets}
    for i, tok in enumerate(tokenized):
        fit = next((b for b in buckets if len(tok.ids) <= b), None)
        if fit is None:
            raise ValueError(f"Example {i} has {len(tok.ids)} tokens, more than the largest bucket {buckets[-1]}.")
        groups[fit].append(i)
    batches = []
    for length, members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            ids = np.full((batch_size, length), pad_id, np.int32)
            att = np.zeros((batch_size, length), np.int32)
            loss = np.zeros((batch_size, length), np.int32)
            index = np.full((batch_size,), -1, np.int32)
            for row, i in enumerate(chunk):
                n = len(tokenized[i].ids)
                ids[row, :n], att[row, :n], loss[row, :n] = tokenized[i].ids, 1, tokenized[i].loss_mask
                index[row] = i
            batches.append(Batch(ids, att, loss, index))
    return batches


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked out anyway)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def calibration_batches(
    tokenizer,
    examples: Sequence[Example],
    batch_size: int,
    text_format: str = "raw",
    max_length: int = 256,
    num_buckets: int = 4,
) -> list[Batch]:
    """Tokenizes, buckets and pads `examples` into micro-batches of `batch_size` rows."""
    tokenized = tokenize_examples(tokenizer, examples, text_format, max_length)
    longest = max((len(t.ids) for t in tokenized), default=1)
    top = min(max_length, max(32, 1 << (longest - 1).bit_length()))
    return make_batches(tokenized, batch_size, pad_id_of(tokenizer), bucket_lengths(top, num_buckets=num_buckets))


def iter_batches(batches: Sequence[Batch], start: int = 0) -> Iterator[tuple[int, Batch]]:
    """(position, batch) pairs from `start`, the resume point of a scan."""
    for i in range(start, len(batches)):
        yield i, batches[i]
