"""The data of the refusal tuning (`harmjax.experiments.refusal.run`): which prompts it trains
on, which it holds out, and the training texts.

Held out, never trained on:
- the main job's held-out prompts: `split_per_category` with the main job's settings and seed
  (`cfg.prompts`, `cfg.prompts_seed`, copied from configs/embedded.py), harmful and benign;
- a further seeded share (`data.eval_fraction`) of every category of the remaining prompts,
  so the refusal rate is measured on more prompts than the main job's few.

Trained on: a seeded per-category sample of the other harmful prompts (the pruning split), each
paired with a refusal text (a seeded choice per prompt), and the other benign instructions
paired with the model's own greedy answers (to keep its utility).

Texts are rendered with the chat template by hand (the "raw" text format of
`harmjax.data.calibration`: prompt + "\\n" + response) so that an answer cut at
`max_new_tokens` carries no end-of-turn token: training on it would teach the model to stop
mid-answer. A refusal and a finished answer end with the template's end-of-turn text.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

import numpy as np

from harmjax.data.calibration import tokenize_example
from harmjax.data.records import Example
from harmjax.experiments.core.prompt_sets import load_benign_prompts, load_harmful_prompts, split_per_category

TEXT_FORMAT = "raw"  # the rendered examples below already hold the chat template
OPENING_SUFFIX = "-opening"  # id suffix of an answer's opening copy (`opening_copies`)


@dataclasses.dataclass(frozen=True)
class RefusalSplit:
    """Prompt sets of the refusal tuning (Examples with empty responses, input order).

    `heldout` / `benign_heldout` include the main job's held-out sets (`main_heldout`,
    `main_benign_heldout`) and this stage's extra held-out prompts."""

    train: list[Example]
    heldout: list[Example]
    main_heldout: list[Example]
    benign_train: list[Example]
    benign_heldout: list[Example]
    main_benign_heldout: list[Example]


def main_job_heldout(prompts, seed: int) -> tuple[list[Example], list[Example]]:
    """(harmful, benign) held-out prompts of the main job (`run_experiment`) with the prompt
    settings `prompts` (its `cfg.prompts` block) and `seed` (its `cfg.seed`)."""
    harmful = load_harmful_prompts(prompts.harmful, prompts.prompt_key, prompts.category_key)
    _, held = split_per_category(harmful, prompts.per_category, prompts.heldout_fraction, seed)
    benign = load_benign_prompts(prompts.benign, prompts.benign_prompt_key)
    _, held_b = split_per_category(benign, prompts.benign_per_category, prompts.benign_heldout_fraction, seed)
    return held, held_b


def split_prompts(cfg) -> RefusalSplit:
    """The prompt sets of `cfg` (configs/refusal_embedded.py); see the module docstring."""
    P, D = cfg.prompts, cfg.data
    harmful = load_harmful_prompts(P.harmful, P.prompt_key, P.category_key)
    benign = load_benign_prompts(P.benign, P.benign_prompt_key)
    main_h, main_b = main_job_heldout(P, cfg.prompts_seed)

    def rest_split(examples, main_held, fraction, per_category):
        held_ids = {e.id for e in main_held}
        rest = [e for e in examples if e.id not in held_ids]
        # Per category: all of the rest, a share held out; then a sample of the remainder to train on.
        pool, extra = split_per_category(rest, 0, fraction, cfg.seed)
        train, _ = split_per_category(pool, per_category, 0.0, cfg.seed)
        held = [e for e in examples if e.id in held_ids or e.id in {x.id for x in extra}]
        return train, held

    train_h, held_h = rest_split(harmful, main_h, D.eval_fraction, D.harmful_per_category)
    train_b, held_b = rest_split(benign, main_b, D.benign_eval_fraction, D.benign_per_category)
    split = RefusalSplit(train_h, held_h, main_h, train_b, held_b, main_b)
    check_disjoint(split.train + split.benign_train, split.heldout + split.benign_heldout)
    return split


def check_disjoint(train: Sequence[Example], heldout: Sequence[Example]) -> None:
    """Raises ValueError when a held-out prompt (by id or, ignoring case and spacing, by text)
    is among the training prompts."""
    def key(e):
        return " ".join(e.prompt.lower().split())

    ids, texts = {e.id for e in train}, {key(e) for e in train}
    leaked = [e.id for e in heldout if e.id in ids or key(e) in texts]
    if leaked:
        raise ValueError(f"{len(leaked)} held-out prompts are in the training set (first: {leaked[:5]}).")


# ------------------------------------------------------------------------------- rendering


def _strip_bos(tokenizer, text: str) -> str:
    # Raw tokenization adds the tokenizer's special tokens itself; a template that writes the
    # BOS as text would otherwise get it twice.
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        ids = tokenizer("x", add_special_tokens=True)["input_ids"]
        if ids and ids[0] == tokenizer.bos_token_id:
            return text[len(bos):]
    return text


def render(tokenizer, prompt: str, response: str, finished: bool, id=None, category=None) -> Example:
    """A raw-format Example whose text is the chat template of one user turn and one assistant
    turn; the assistant turn's end-of-turn text is included only when `finished`."""
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    if not head.endswith("\n"):
        raise ValueError("Refusal tuning renders the chat template as raw text and needs a generation prompt "
                         f"ending in a newline; this template's ends with {head[-20:]!r}.")
    tail = response
    if finished:
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(head) and response in full[len(head):]:
            tail = full[len(head):]  # the response and the template's end-of-turn text
    # The raw format puts "\n" between prompt and response: the generation prompt's own newline.
    return Example(prompt=_strip_bos(tokenizer, head)[:-1], response=tail, category=category, id=id)


def num_tokens(tokenizer, example: Example) -> int:
    """Tokens of a rendered example (untruncated)."""
    return len(tokenize_example(tokenizer, example, TEXT_FORMAT, 1 << 20).ids)


def refusal_examples(tokenizer, prompts: Sequence[Example], refusals: Sequence[str], seed: int,
                     max_length: int) -> tuple[list[Example], int]:
    """(examples, dropped): each prompt with a refusal chosen by rng([seed, crc32(id)]) (so a
    prompt's refusal does not depend on the other prompts); prompts whose example would not
    fit in `max_length` tokens are dropped (truncating them would cut the chat template)."""
    out, dropped = [], 0
    for e in prompts:
        rng = np.random.default_rng([seed, zlib.crc32(e.id.encode())])
        ex = render(tokenizer, e.prompt, refusals[int(rng.integers(len(refusals)))], True, e.id, e.category)
        if num_tokens(tokenizer, ex) <= max_length:
            out.append(ex)
        else:
            dropped += 1
    return out, dropped


def answer_examples(tokenizer, rows: Sequence[dict], max_new_tokens: int, max_length: int) -> list[Example]:
    """Rendered examples of answer rows (`harmjax.experiments.core.answers`): an answer that stopped
    before `max_new_tokens` is finished; a longer example is cut (as unfinished) to fit."""
    out = []
    for r in rows:
        text, finished = r["response"], r["tokens"] < max_new_tokens
        ex = render(tokenizer, r["prompt"], text, finished, r["id"], r["category"])
        if num_tokens(tokenizer, ex) > max_length:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            keep = max(1, len(ids) - (num_tokens(tokenizer, ex) - max_length))
            while keep > 1:
                ex = render(tokenizer, r["prompt"], tokenizer.decode(ids[:keep]), False, r["id"], r["category"])
                if num_tokens(tokenizer, ex) <= max_length:
                    break
                keep -= 1
        if text.strip() and num_tokens(tokenizer, ex) <= max_length:
            out.append(ex)
    return out



def opening_copies(tokenizer, rows: Sequence[dict], n_tokens: int) -> list[Example]:
    """Each answer row's first `n_tokens` tokens as an extra, unfinished example: the answer's
    opening is where the model decides between answering and refusing, and in a whole answer
    it is one token among ~50 of the loss, against a refusal's ~12."""
    out = []
    for r in rows:
        ids = tokenizer(r["response"], add_special_tokens=False)["input_ids"][:n_tokens]
        if ids:
            out.append(render(tokenizer, r["prompt"], tokenizer.decode(ids), False, r["id"] + OPENING_SUFFIX, r["category"]))
    return out
