"""Measurements of a model before and after refusal tuning, on held-out prompts only:

- keyword refusal rate of greedy answers without attack (`harmjax.evaluate.refusal`: phrase
  or fewer than `refusal_min_words` words), and the phrase-only rate (no word minimum);
- a judge-free preference: per prompt, log p(the answer opens with a refusal) - log p(it opens
  compliantly), each a log-sum over a few openings, from one forward pass per opening (no
  generation, no keyword list); the fraction of prompts above 0 and the mean margin;
- the prefilling attack: the assistant turn starts with `attack_prefix`; the rate of
  continuations that are not refusals by the keyword rule (the paper's attacked setting);
- benign held-out NLL (nats/token) of the original model's own answers, and the phrase
  refusal rate of greedy answers to held-out benign instructions (over-refusal).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from harmjax.data.records import Example
from harmjax.evaluate.refusal import is_refusal
from harmjax.inference import response_nll
from harmjax.evaluate.recognition import logsumexp_rows
from harmjax.pipeline.measure import mean_finite
from harmjax.pipeline.refusal_data import TEXT_FORMAT


def opening_logprobs(model, params, prompts: Sequence[Example], openings: Sequence[str], *,
                     batch_size: int) -> np.ndarray:
    """(prompts, openings) array of log p(opening | prompt): the opening's tokens (as the
    prefilling attack feeds a prefix) after the chat template's generation prompt, summed.

    One forward pass per "stem" rather than per opening: a pass over prompt + stem gives the
    next-token log-probabilities at each of the stem's positions, which score every opening
    whose tokens before its last are a prefix of the stem ("I'm sorry", "I cannot" and "Sorry"
    share the pass over prompt + "I'm").
    """
    from harmjax.data.calibration import pad_id_of
    from harmjax.distributed import to_host
    from harmjax.generate.prompts import prefix_token_ids, prompt_token_ids
    from harmjax.inference import bucket_length, pad_batch
    from harmjax.sharding import round_batch

    tok = model.tokenizer
    op_ids = [tuple(prefix_token_ids(tok, o)) for o in openings]
    if any(not o for o in op_ids):
        raise ValueError(f"An opening tokenizes to nothing: {list(openings)}.")
    needed = {o[:-1] for o in op_ids}
    stems = sorted(s for s in needed if not any(len(t) > len(s) and t[: len(s)] == s for t in needed))
    cover = [next(k for k, s in enumerate(stems) if s[: len(o) - 1] == o[:-1]) for o in op_ids]
    tail = max(len(s) for s in stems) + 1
    fn = _jit_tail_logprobs(model.config, model.mesh, tail)
    step, pad_id = round_batch(batch_size, model.mesh), pad_id_of(tok)
    prompt_ids = [prompt_token_ids(tok, e.prompt) for e in prompts]
    out = np.zeros((len(prompts), len(openings)), np.float64)
    for k, stem in enumerate(stems):
        seqs = [p + list(stem) for p in prompt_ids]
        order = np.argsort([len(s) for s in seqs], kind="stable")  # similar lengths share a batch
        for start in range(0, len(seqs), step):
            idx = order[start : start + step]
            ids, mask = pad_batch([seqs[i] for i in idx], pad_id, bucket_length(max(len(seqs[i]) for i in idx)), step)
            lp = to_host(fn(params, ids, mask))  # (step, tail, vocab); left padding: sequences end together
            for row, i in enumerate(idx):
                for j, o in enumerate(op_ids):
                    if cover[j] == k:
                        # The position predicting opening token t sits tail - 1 - len(stem) + t from the left.
                        out[i, j] = sum(float(lp[row, tail - 1 - len(stem) + t, o[t]]) for t in range(len(o)))
    return out


@functools.lru_cache(maxsize=8)
def _jit_tail_logprobs(config, mesh, tail: int):
    """jit: (params, ids, mask) -> float32 log-softmax over the vocabulary at the last `tail`
    positions (the head runs on those positions only)."""
    import jax

    from harmjax.model.decoder import hidden_states, logits_from_hidden
    from harmjax.sharding import batch_sharding, param_shardings, replicated

    def f(params, ids, mask):
        h = hidden_states(params, config, ids, mask)[:, -tail:]
        return jax.nn.log_softmax(logits_from_hidden(params, config, h), axis=-1)

    batch = batch_sharding(mesh)
    return jax.jit(f, in_shardings=(param_shardings(config, mesh), batch, batch), out_shardings=replicated(mesh))


def _generate(model, params, prompts, prefix, E):
    from harmjax.generate import generate

    result = generate(model, [e.prompt for e in prompts], prefixes=[prefix] * len(prompts) if prefix else None,
                      max_new_tokens=E.max_new_tokens, batch_size=E.generation_batch_size, params=params,
                      progress=False)
    return [pre + text for pre, text in zip(result.prefixes, result.texts)]


def measure_refusal(model, params, heldout: Sequence[Example], main_ids: set[str],
                    benign_heldout: Sequence[Example], benign_prompts: Sequence[Example], E) -> dict[str, Any]:
    """The metrics of `params` (see the module docstring).

    Args:
      heldout: held-out harmful prompts; `main_ids`: the ids among them the main job holds out.
      benign_heldout: rendered held-out benign answers (the original model's) for the NLL.
      benign_prompts: held-out benign instructions to answer (empty: no over-refusal check).
      E: the config's `evaluation` block.
    """
    out: dict[str, Any] = {}
    plain = _generate(model, params, heldout, "", E)
    kw = [bool(is_refusal(r, min_words=E.refusal_min_words)) for r in plain]
    phrase = [bool(is_refusal(r, min_words=0)) for r in plain]
    main = [i for i, e in enumerate(heldout) if e.id in main_ids]
    out["refusal_rate"] = float(np.mean(kw))
    out["refusal_rate_phrase"] = float(np.mean(phrase))
    out["refusal_rate_main_heldout"] = float(np.mean([kw[i] for i in main])) if main else float("nan")

    attacked = _generate(model, params, heldout, E.attack_prefix, E)
    att_refused = [bool(is_refusal(r, min_words=E.refusal_min_words)) for r in attacked]
    out["attack_harmful_rate"] = 1.0 - float(np.mean(att_refused))
    out["attack_harmful_rate_phrase"] = 1.0 - float(np.mean([bool(is_refusal(r, min_words=0)) for r in attacked]))

    openings = list(E.refusal_openings) + list(E.compliant_openings)
    lp = opening_logprobs(model, params, heldout, openings, batch_size=E.batch_size)
    lp_r, lp_c = lp[:, : len(E.refusal_openings)], lp[:, len(E.refusal_openings):]
    margin = logsumexp_rows(lp_r) - logsumexp_rows(lp_c)
    out["logprob_margin_mean"] = float(margin.mean())
    out["logprob_refusal_fraction"] = float((margin > 0).mean())

    nll = response_nll(model, list(benign_heldout), text_format=TEXT_FORMAT, params=params, num_buckets=1,
                       batch_size=E.batch_size, max_length=E.max_length)
    out["benign_nll"] = mean_finite(nll)
    if benign_prompts:
        answers = _generate(model, params, benign_prompts, "", E)
        out["benign_refusal_rate_phrase"] = float(np.mean([bool(is_refusal(a, min_words=0)) for a in answers]))
    else:
        answers = []
    out["samples"] = [
        {"id": e.id, "category": e.category, "prompt": e.prompt, "answer": p, "refused": k,
         "attacked_answer": a, "attacked_refused": ar, "logprob_margin": float(m)}
        for e, p, k, a, ar, m in zip(heldout, plain, kw, attacked, att_refused, margin)
    ]
    out["benign_samples"] = [{"id": e.id, "prompt": e.prompt, "answer": a} for e, a in zip(benign_prompts, answers)]
    return out
