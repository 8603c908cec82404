"""Token log-likelihood scoring on the model's mesh, and perplexity over a text corpus.

`target_logprob_sums` is what both perplexity and multiple-choice scoring use: the summed
log-probability of chosen target tokens of each sequence (`harmjax.inference.token_logprobs`,
summed inside the jit), batched over the mesh's data x fsdp axes, with sequences grouped by
length and padded to power-of-two buckets so XLA compiles few shapes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from harmjax.data.calibration import pad_id_of
from harmjax.errors import MissingFileError
from harmjax.inference import bucket_length, next_token_targets, pad_batch, token_logprobs
from harmjax.sharding import round_batch

# Names that mean WikiText-2 (raw) on the hub; the canonical repository comes first.
WIKITEXT_NAMES = ("wikitext", "wikitext-2", "wikitext2", "wikitext-2-raw-v1")
WIKITEXT_HUB = ("Salesforce/wikitext:wikitext-2-raw-v1", "wikitext:wikitext-2-raw-v1")

# How the documents of a corpus are concatenated (as in the Hugging Face perplexity guide).
CORPUS_SEPARATOR = "\n\n"


def bos_prefix(tokenizer) -> list[int]:
    """[bos id] when the tokenizer puts a BOS token in front of plain text by default
    (Llama, Gemma), else []; scoring code encodes without special tokens and adds this."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def target_logprob_sums(
    model,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    params: Any = None,
    desc: str = "scoring",
) -> np.ndarray:
    """Summed log-probability of the target tokens of each (ids, targets) row (float64, one per row).

    `targets[t] = 1` marks token t as scored, given tokens 0..t-1 of the same row; targets[0]
    must be 0 (nothing predicts the first token). Rows are sorted by length, cut into batches
    of `batch_size` (rounded up to a multiple of the mesh's data x fsdp extent), right-padded
    to a power-of-two length, and run through one jitted forward pass per batch on the
    model's mesh. `params` overrides `model.params` (e.g. a pruned copy).
    """
    for i, (ids, targets) in enumerate(rows):
        if len(ids) != len(targets):
            raise ValueError(f"Row {i}: {len(ids)} ids but {len(targets)} target flags.")
        if len(targets) and targets[0]:
            raise ValueError(f"Row {i}: the first token cannot be a target (nothing precedes it).")
    step = round_batch(batch_size, model.mesh)
    pad_id = pad_id_of(model.tokenizer)
    # Longest first: a too-long batch fails (out of memory) at once, not at the end of a run.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = np.zeros(len(rows), np.float64)
    batches = range(0, len(order), step)
    for start in tqdm(batches, desc=desc, disable=len(batches) < 2, leave=False):
        chunk = order[start : start + step]
        length = bucket_length(max(len(rows[i][0]) for i in chunk))
        ids, mask = pad_batch([rows[i][0] for i in chunk], pad_id, length, step, left=False)
        targets, _ = pad_batch([rows[i][1] for i in chunk], 0, length, step, left=False)
        sums = token_logprobs(model, ids, mask, *next_token_targets(ids, targets), reduce="sum", params=params)
        out[chunk] = sums.astype(np.float64)[: len(chunk)]
    return out


def rolling_windows(n_tokens: int, max_length: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of each window over a sequence of `n_tokens` tokens.

    A window feeds tokens [begin, end) to the model and scores tokens [first_target, end). With
    the default stride (max_length - 1) consecutive windows share exactly one token, the last
    of one being the first (context-only) token of the next, so every token but the very first
    is scored exactly once. A smaller stride slides the window by `stride` tokens and scores only
    the tokens not scored before, each with up to max_length - 1 tokens of context (the Hugging
    Face perplexity guide's scheme); stride = max_length gives disjoint windows whose first
    token is never scored.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}.")
    stride = max_length - 1 if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}.")
    windows, prev_end, begin = [], 0, 0
    while prev_end < n_tokens:
        end = min(begin + max_length, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        prev_end, begin = end, begin + stride
    return windows


def perplexity(
    model,
    texts: str | Sequence[str],
    max_length: int = 1024,
    batch_size: int = 8,
    stride: int | None = None,
    params: Any = None,
) -> dict[str, float]:
    """Perplexity of `model` on a corpus.

    The texts are joined with blank lines ("\\n\\n", as the usual WikiText-2 evaluation does),
    tokenized once without special tokens (a BOS token is put first if the tokenizer adds one
    to plain text), and cut into windows of `max_length` tokens (see `rolling_windows`): by
    default non-overlapping prediction windows in which every token but the first is scored
    once, each given the preceding tokens of its window; with `stride` < max_length - 1,
    sliding windows that give each token more context at proportionally more compute.

    Returns:
      dict(ppl=exp(nll), nll=mean NLL per scored token in nats, tokens=number of scored
      tokens, windows=number of windows).
    """
    text = texts if isinstance(texts, str) else CORPUS_SEPARATOR.join(texts)
    tok = model.tokenizer
    ids = bos_prefix(tok) + list(tok(text, add_special_tokens=False)["input_ids"])
    windows = rolling_windows(len(ids), max_length, stride)
    if not windows:
        raise ValueError(f"The corpus has {len(ids)} token(s): nothing to score.")
    rows = [
        (ids[begin:end], [0] * (first - begin) + [1] * (end - first)) for begin, end, first in windows
    ]
    total = float(target_logprob_sums(model, rows, batch_size, params, desc="perplexity").sum())
    tokens = sum(end - first for _, end, first in windows)
    nll = -total / tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": tokens, "windows": len(windows)}


def load_text_corpus(name_or_path: str, split: str = "test") -> list[str]:
    """The documents of a text corpus, ready for `perplexity`.

    Args:
      name_or_path: a local .txt file (one text: the whole file), a .jsonl/.json/.csv file with
        a "text" column (one text per row), "wikitext" / "wikitext-2-raw-v1" (WikiText-2 raw
        through `datasets`, when the hub or its cache is reachable), or any hub dataset
        "name[:config]" with a "text" column.
      split: the hub split (ignored for local files).

    Raises:
      MissingFileError: a local path that does not exist.
      HubUnavailableError: a hub corpus that cannot be reached; the message names the local
        file to pass instead.
      DatasetFormatError: a table without a "text" column.
    """
    from harmjax.data.records import DatasetFormatError, read_records
    from harmjax.errors import HubUnavailableError

    if name_or_path.lower().endswith(".txt") or os.path.isfile(name_or_path):
        if not os.path.isfile(name_or_path):
            raise MissingFileError(f"No text corpus file at {name_or_path}.")
        if name_or_path.lower().endswith(".txt"):
            with open(name_or_path, encoding="utf-8") as f:
                return [f.read()]
    sources = WIKITEXT_HUB if name_or_path.lower() in WIKITEXT_NAMES else (name_or_path,)
    errors = []
    for source in sources:
        try:
            rows = read_records(source, split=split)
            break
        except HubUnavailableError as e:
            errors.append(str(e))
    else:
        raise HubUnavailableError(
            f"Cannot load the text corpus {name_or_path!r} (split {split!r}): the hub is unreachable "
            "and it is not in the datasets cache. Pass a local file instead: a .txt file (e.g. "
            "WikiText-2's wiki.test.raw renamed to .txt) or a .jsonl with a \"text\" field per row. "
            f"Details: {' | '.join(errors)}"
        )
    if rows and "text" not in rows[0]:
        raise DatasetFormatError(f"{name_or_path}: no 'text' column; columns are {sorted(rows[0])}.")
    for number, row in enumerate(rows):
        if not isinstance(row.get("text"), str):
            raise DatasetFormatError(f"{name_or_path}, row {number}: 'text' is missing or not a string.")
    return [row["text"] for row in rows]
