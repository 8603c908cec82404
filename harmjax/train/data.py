"""Fine-tuning data: tokenization with a response-only loss mask, a seeded train/validation
split, seeded per-epoch shuffles and fixed padded length buckets.

`Example`s are tokenized by `harmjax.data.calibration.tokenize_example` (chat template by
default, "raw" = prompt + newline + response). A `ChatExample` with `messages` is rendered with
the chat template turn by turn; the loss covers every assistant turn (its content and the
template's end-of-turn tokens), found from character offsets.

Every optimizer step takes the next `batch_size` examples of the epoch's permutation
(rng([seed, epoch])) and pads them, right-padded, to the smallest bucket that holds the longest
of them, as (accum, micro, length) arrays (filler rows are all-masked and weigh nothing). So
the data position is a function of the step number alone, and XLA compiles one step per bucket.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence

import numpy as np

from harmjax.data.calibration import Tokenized, bucket_lengths, pad_id_of, tokenize_example
from harmjax.data.records import DatasetFormatError, Example


def tokenize_chat(tokenizer, messages: Sequence[dict], max_length: int, example_id=None) -> Tokenized:
    """Token ids and assistant-only loss mask of a whole conversation (chat template).

    Assistant turn i covers the characters between the template rendered up to turn i with a
    generation prompt and the template rendered through turn i. Truncated from the right.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("Chat fine-tuning needs a tokenizer with a chat template; this one has none.")
    msgs = [dict(m) for m in messages]
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    spans = []
    for i, m in enumerate(msgs):
        if m.get("role") != "assistant":
            continue
        start_text = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        end_text = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not full.startswith(end_text) or not end_text.startswith(start_text):
            raise DatasetFormatError(
                f"Example {example_id!r}: the chat template rewrites earlier turns, so assistant "
                "turns cannot be located in the rendered conversation."
            )
        spans.append((len(start_text), len(end_text)))
    if not spans:
        raise DatasetFormatError(f"Example {example_id!r} has no assistant turn to train on.")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])[:max_length]
    mask = []
    for begin, end in enc["offset_mapping"][:max_length]:
        mask.append(int(any(end > s and begin < e for s, e in spans)))
    if not any(mask):
        raise DatasetFormatError(f"Example {example_id!r}: no assistant token survives max_length={max_length}.")
    return Tokenized(np.asarray(ids, np.int32), np.asarray(mask, np.int32))


def tokenize_for_training(tokenizer, examples: Sequence[Example], text_format: str = "chat",
                          max_length: int = 512) -> list[Tokenized]:
    """Tokenizes every example (ChatExample messages through the chat template)."""
    out = []
    for ex in examples:
        messages = getattr(ex, "messages", ())
        if messages and text_format == "chat":
            out.append(tokenize_chat(tokenizer, messages, max_length, ex.id))
        else:
            out.append(tokenize_example(tokenizer, ex, text_format, max_length))
    return out


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) example indices: a seeded permutation, the first round(n * val_fraction)
    (at least 1 when the fraction is positive and n > 1) held out; both sorted."""
    n_val = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@dataclasses.dataclass(frozen=True)
class TrainData:
    """Tokenized examples, the split, and the bucketing of one fine-tuning run."""

    tokenized: list[Tokenized]
    train: np.ndarray
    val: np.ndarray
    batch_size: int
    micro_batch_size: int
    buckets: tuple[int, ...]
    pad_id: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per pass over the training split (the last one may be partial)."""
        return math.ceil(len(self.train) / self.batch_size)

    def position(self, step: int) -> dict[str, int]:
        """Where optimizer step `step` (0-based) reads: epoch and step within it."""
        return {"epoch": step // self.steps_per_epoch, "step_in_epoch": step % self.steps_per_epoch}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Training example indices in the seeded order of `epoch`."""
        return self.train[np.random.default_rng([self.seed, epoch]).permutation(len(self.train))]

    def step_batch(self, step: int) -> dict[str, np.ndarray]:
        """The (accum, micro, length) int32 arrays of optimizer step `step`."""
        pos = self.position(step)
        order = self.epoch_order(pos["epoch"])
        start = pos["step_in_epoch"] * self.batch_size
        members = order[start : start + self.batch_size]
        rows = pad_rows([self.tokenized[i] for i in members], self.batch_size, self.buckets, self.pad_id)
        accum = self.batch_size // self.micro_batch_size
        return {k: v.reshape(accum, self.micro_batch_size, -1) for k, v in rows.items()}

    def val_batches(self) -> list[dict[str, np.ndarray]]:
        """Validation micro-batches (micro, length), bucketed by length, in a fixed order."""
        order = sorted(self.val.tolist(), key=lambda i: len(self.tokenized[i].ids))
        out = []
        for s in range(0, len(order), self.micro_batch_size):
            chunk = [self.tokenized[i] for i in order[s : s + self.micro_batch_size]]
            out.append(pad_rows(chunk, self.micro_batch_size, self.buckets, self.pad_id))
        return out

    def fingerprint(self) -> str:
        """sha256 over every example's ids and loss mask and the split: changes with the data."""
        h = hashlib.sha256()
        for t in self.tokenized:
            h.update(t.ids.tobytes())
            h.update(t.loss_mask.tobytes())
            h.update(b"|")
        h.update(self.val.tobytes())
        return h.hexdigest()


def pad_rows(rows: Sequence[Tokenized], batch: int, buckets: Sequence[int], pad_id: int) -> dict[str, np.ndarray]:
    """`rows` right-padded to the smallest bucket holding the longest, plus filler rows up to
    `batch` (all-masked)."""
    longest = max((len(t.ids) for t in rows), default=1)
    length = next((b for b in sorted(buckets) if longest <= b), None)
    if length is None:
        raise ValueError(f"An example has {longest} tokens, more than the largest bucket {max(buckets)}.")
    ids = np.full((batch, length), pad_id, np.int32)
    att = np.zeros((batch, length), np.int32)
    loss = np.zeros((batch, length), np.int32)
    for r, t in enumerate(rows):
        n = len(t.ids)
        ids[r, :n], att[r, :n], loss[r, :n] = t.ids, 1, t.loss_mask
    return {"input_ids": ids, "attention_mask": att, "loss_mask": loss}


def prepare(tokenizer, examples: Sequence[Example], batch_size: int, micro_batch_size: int,
            max_length: int, val_fraction: float, seed: int, text_format: str = "chat",
            num_buckets: int = 4) -> TrainData:
    """Tokenizes, splits and sets up bucketing for a fine-tuning run."""
    if not examples:
        raise DatasetFormatError("finetune needs at least one example.")
    tokenized = tokenize_for_training(tokenizer, examples, text_format, max_length)
    train, val = split_indices(len(tokenized), val_fraction, seed)
    longest = max(len(t.ids) for t in tokenized)
    top = min(max_length, max(32, 1 << (longest - 1).bit_length()))
    buckets = tuple(bucket_lengths(top, minimum=32, num_buckets=num_buckets))
    return TrainData(tokenized, train, val, batch_size, micro_batch_size, buckets, pad_id_of(tokenizer), seed)
