"""Log-probabilities of answer openings: how likely a model's reply to a prompt starts with a
given string, read off one forward pass without generating.

`opening_logprobs` scores, for each prompt (in the model's chat template, up to the generation
prompt), the summed log-probability of each opening's tokens; the refusal experiment compares
refusal openings ("I'm sorry", "I cannot") against compliant ones, and recognition
(`harmjax.evaluate.recognition`) compares "Yes" against "No". `logsumexp_rows` folds several
openings into the probability of any of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from harmjax.data.records import Example
from harmjax.inference import bucket_length, pad_batch, token_logprobs


def logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """log sum exp over axis 1 of a 2-D float array (float64)."""
    x = np.asarray(x, np.float64)
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


def opening_logprobs(model, params, prompts: Sequence[Example], openings: Sequence[str], *,
                     batch_size: int) -> np.ndarray:
    """(prompts, openings) float64 array of log p(opening | prompt): the opening's tokens (as the
    prefilling attack feeds a prefix) after the chat template's generation prompt, summed.

    One forward pass per "stem" rather than per opening: a pass over prompt + stem gives the
    next-token log-probabilities at each of the stem's positions, which score every opening
    whose tokens before its last are a prefix of the stem ("I'm sorry", "I cannot" and "Sorry"
    share the pass over prompt + "I'm"). `params` overrides the model's when not None.
    """
    from harmjax.data.calibration import pad_id_of
    from harmjax.generate.prompts import prefix_token_ids, prompt_token_ids
    from harmjax.sharding import round_batch

    tok = model.tokenizer
    op_ids = [tuple(prefix_token_ids(tok, o)) for o in openings]
    if any(not o for o in op_ids):
        raise ValueError(f"An opening tokenizes to nothing: {list(openings)}.")
    needed = {o[:-1] for o in op_ids}
    stems = sorted(s for s in needed if not any(len(t) > len(s) and t[: len(s)] == s for t in needed))
    cover = [next(k for k, s in enumerate(stems) if s[: len(o) - 1] == o[:-1]) for o in op_ids]
    # Every pass reads the last `tail` positions (left padding: sequences end together), so
    # all stems share one compiled shape per length bucket.
    tail = max(len(s) for s in stems) + 1
    step, pad_id = round_batch(batch_size, model.mesh), pad_id_of(tok)
    prompt_ids = [prompt_token_ids(tok, e.prompt) for e in prompts]
    out = np.zeros((len(prompts), len(openings)), np.float64)
    for k, stem in enumerate(stems):
        # The position predicting opening token t sits tail - 1 - len(stem) + t within the tail;
        # openings of other stems gather token 0 there, unused.
        mine = [j for j in range(len(op_ids)) if cover[j] == k]
        gather = np.zeros((tail, len(openings)), np.int32)
        for j in mine:
            for t, token in enumerate(op_ids[j]):
                gather[tail - 1 - len(stem) + t, j] = token
        gather = np.broadcast_to(gather, (step, tail, len(openings)))
        seqs = [p + list(stem) for p in prompt_ids]
        order = np.argsort([len(s) for s in seqs], kind="stable")  # similar lengths share a batch
        for start in range(0, len(seqs), step):
            idx = order[start : start + step]
            ids, mask = pad_batch([seqs[i] for i in idx], pad_id, bucket_length(max(len(seqs[i]) for i in idx)), step)
            length = ids.shape[1]
            positions = np.broadcast_to(np.arange(length - tail, length, dtype=np.int32), (step, tail))
            lp = token_logprobs(model, ids, mask, positions, gather, params=params)  # (step, tail, openings)
            for row, i in enumerate(idx):
                for j in mine:
                    first = tail - 1 - len(stem)
                    out[i, j] = sum(float(lp[row, first + t, j]) for t in range(len(op_ids[j])))
    return out


__all__ = ["logsumexp_rows", "opening_logprobs"]
