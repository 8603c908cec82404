"""Zero-shot multiple-choice accuracy by log-likelihood, and the six utility tasks' loaders.

Each choice is scored as lm-evaluation-harness scores it: the summed log-probability of the
continuation `delimiter + choice` (delimiter " ") given the context. `acc` picks the highest
sum, `acc_norm` the highest sum per character of the choice. Prompt formats follow the
harness's task definitions (super_glue/boolq, glue/rte, hellaswag, winogrande, arc_challenge,
openbookqa).

Local files (.jsonl / .json / .csv) are read in either of two schemas:
  generic: {"context": str, "choices": [str, ...], "label": int}
           (optional "id"; optional "contexts": [str, ...] for one context per choice)
  native:  the task's own hub columns, e.g. boolq {"passage", "question", "label"}, winogrande
           {"sentence", "option1", "option2", "answer"}, arc {"question", "choices": {"text",
           "label"}, "answerKey"} (see TASKS below for each).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from harmjax.evaluate.perplexity import bos_prefix, target_logprob_sums


@dataclasses.dataclass(frozen=True)
class MCItem:
    """One multiple-choice question.

    Choice i is scored as the continuation `delimiter + choices[i]` after `context`, or after
    `contexts[i]` when given (WinoGrande's partial scoring: one context per option, the same
    continuation for all). `label` is the index of the correct choice.
    """

    context: str
    choices: tuple[str, ...]
    label: int
    id: str | None = None
    contexts: tuple[str, ...] | None = None
    delimiter: str = " "

    def __post_init__(self):
        object.__setattr__(self, "choices", tuple(self.choices))
        object.__setattr__(self, "label", int(self.label))
        if self.contexts is not None:
            object.__setattr__(self, "contexts", tuple(self.contexts))
        where = f"MCItem {self.id!r}" if self.id is not None else "MCItem"
        if len(self.choices) < 2:
            raise ValueError(f"{where}: needs at least 2 choices, got {len(self.choices)}.")
        if not 0 <= self.label < len(self.choices):
            raise ValueError(f"{where}: label {self.label} is not an index into {len(self.choices)} choices.")
        if self.contexts is not None and len(self.contexts) != len(self.choices):
            raise ValueError(f"{where}: {len(self.contexts)} contexts for {len(self.choices)} choices.")

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) of each choice, in choice order."""
        contexts = self.contexts or (self.context,) * len(self.choices)
        return [(c, self.delimiter + choice) for c, choice in zip(contexts, self.choices)]


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split as lm-evaluation-harness splits them.

    Trailing whitespace of the context moves to the continuation; the continuation's tokens
    are those of encode(context + continuation) past encode(context), so a token merging
    across the boundary is counted in the continuation. A BOS token is put first when the
    tokenizer adds one to plain text; an empty context becomes the harness's prefix token,
    [BOS] (or [EOS] for a tokenizer without one).
    """
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    prefix = bos_prefix(tokenizer)
    if not stripped:
        prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        start = [prefix_id if prefix_id is not None else 0]
        return start, list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    return prefix + list(ctx), list(whole[len(ctx):])


def choice_logprobs(
    model,
    items: Sequence[MCItem],
    batch_size: int = 8,
    max_length: int = 2048,
    params: Any = None,
) -> list[np.ndarray]:
    """Summed log-probability of each item's choices (one float64 array per item).

    Sequences longer than `max_length` lose tokens from the start of the context.
    """
    tok = model.tokenizer
    rows, owners = [], []
    for n, item in enumerate(items):
        for k, (context, continuation) in enumerate(item.requests()):
            ctx, cont = encode_request(tok, context, continuation)
            if not cont:
                raise ValueError(f"Item {item.id or n}, choice {k}: the continuation {continuation!r} has no tokens.")
            if len(cont) >= max_length:
                raise ValueError(
                    f"Item {item.id or n}, choice {k}: the continuation has {len(cont)} tokens, "
                    f"max_length is {max_length}."
                )
            ids = (ctx + cont)[-max_length:]
            rows.append((ids, [0] * (len(ids) - len(cont)) + [1] * len(cont)))
            owners.append(n)
    sums = target_logprob_sums(model, rows, batch_size, params, desc="multiple choice")
    out: list[list[float]] = [[] for _ in items]
    for owner, value in zip(owners, sums):
        out[owner].append(value)
    return [np.asarray(v, np.float64) for v in out]


def multiple_choice_accuracy(
    model, items: Sequence[MCItem], batch_size: int = 8, max_length: int = 2048, params: Any = None
) -> dict[str, Any]:
    """Zero-shot accuracy of `model` on `items` by log-likelihood of each choice.

    Returns:
      dict(acc, acc_norm, n, per_item) where acc counts items whose correct choice has the
      highest summed log-probability, acc_norm the same after dividing each sum by the choice's
      length in characters (lm-evaluation-harness's acc_norm; ties go to the first choice), and
      per_item lists {id, label, pred, pred_norm, logprobs} per item.
    """
    if not items:
        raise ValueError("No multiple-choice items to score.")
    scores = choice_logprobs(model, items, batch_size, max_length, params)
    per_item, correct, correct_norm = [], 0, 0
    for n, (item, lp) in enumerate(zip(items, scores)):
        lengths = np.asarray([max(len(c), 1) for c in item.choices], np.float64)
        pred, pred_norm = int(np.argmax(lp)), int(np.argmax(lp / lengths))
        correct += pred == item.label
        correct_norm += pred_norm == item.label
        per_item.append(
            {"id": item.id if item.id is not None else str(n), "label": int(item.label),
             "pred": pred, "pred_norm": pred_norm, "logprobs": lp.tolist()}
        )
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "n": len(items), "per_item": per_item}


# ----------------------------------------------------------------------------- task formats


class _RowError(Exception):
    """A native row lacks a column or has a bad value; turned into DatasetFormatError."""


def _get(row: dict, *keys: str) -> Any:
    for key in keys:
        if key in row and row[key] is not None:
            return row[key]
    raise _RowError(f"no column {' / '.join(map(repr, keys))}")


def _int_label(value: Any, n: int) -> int:
    try:
        label = int(value)
    except (TypeError, ValueError):
        raise _RowError(f"label {value!r} is not an integer") from None
    if not 0 <= label < n:
        raise _RowError(f"label {label} is out of range for {n} choices")
    return label


def _choice_table(row: dict) -> tuple[list[str], list[str]]:
    """ARC / OpenBookQA choices: {"text": [...], "label": [...]} (or a JSON string of it)."""
    choices = _get(row, "choices")
    if isinstance(choices, str):
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError:
            raise _RowError("'choices' is a string but not JSON") from None
    if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) or not isinstance(choices.get("label"), list):
        raise _RowError("'choices' must be {\"text\": [...], \"label\": [...]}")
    return [str(t) for t in choices["text"]], [str(l).strip() for l in choices["label"]]


def _keyed_answer(row: dict, labels: list[str], key: str) -> int:
    answer = str(_get(row, key)).strip()
    if answer not in labels:
        raise _RowError(f"{key} {answer!r} is not one of the choice labels {labels}")
    return labels.index(answer)


def _boolq(row: dict) -> MCItem:
    # label 1 = yes; google/boolq has a boolean "answer" instead.
    label = row["label"] if row.get("label") is not None else _get(row, "answer")
    label = int(label) if isinstance(label, bool) else _int_label(label, 2)
    return MCItem(f"{_get(row, 'passage')}\nQuestion: {_get(row, 'question')}?\nAnswer:", ("no", "yes"), label)


def _rte(row: dict) -> MCItem:
    # glue/rte: sentence1, sentence2; super_glue/rte: premise, hypothesis. label 0 = entailment.
    premise, hypothesis = _get(row, "sentence1", "premise"), _get(row, "sentence2", "hypothesis")
    return MCItem(
        f"{premise}\nQuestion: {hypothesis} True or False?\nAnswer:", ("True", "False"),
        _int_label(_get(row, "label"), 2),
    )


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow artifacts
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> MCItem:
    endings = _get(row, "endings")
    if isinstance(endings, str):
        endings = json.loads(endings)
    if not isinstance(endings, list):
        raise _RowError("'endings' must be a list of strings")
    ctx = f"{_get(row, 'ctx_a')} {str(_get(row, 'ctx_b')).capitalize()}"
    return MCItem(
        _hellaswag_clean(f"{_get(row, 'activity_label')}: {ctx}"),
        tuple(_hellaswag_clean(str(e)) for e in endings),
        _int_label(_get(row, "label"), len(endings)),
    )


def _winogrande(row: dict) -> MCItem:
    sentence = str(_get(row, "sentence"))
    if "_" not in sentence:
        raise _RowError("'sentence' has no '_' blank")
    blank = sentence.index("_")
    options = (str(_get(row, "option1")), str(_get(row, "option2")))
    answer = str(_get(row, "answer")).strip()
    if answer not in ("1", "2"):
        raise _RowError(f"answer {answer!r} is not '1' or '2' (unlabeled test split?)")
    target = sentence[blank + 1 :].strip()
    # Partial scoring: the context is the sentence up to the blank filled with each option;
    # the continuation, the rest of the sentence, is the same for both.
    return MCItem(
        sentence[:blank], (target, target), int(answer) - 1,
        contexts=tuple(sentence[:blank] + o for o in options),
    )


def _arc(row: dict) -> MCItem:
    texts, labels = _choice_table(row)
    return MCItem(f"Question: {_get(row, 'question')}\nAnswer:", tuple(texts), _keyed_answer(row, labels, "answerKey"))


def _openbookqa(row: dict) -> MCItem:
    texts, labels = _choice_table(row)
    return MCItem(str(_get(row, "question_stem")), tuple(texts), _keyed_answer(row, labels, "answerKey"))


@dataclasses.dataclass(frozen=True)
class MCTask:
    """A task: its hub dataset ("path:config"), default split, and native-row formatter."""

    hub: str
    split: str
    format_row: Callable[[dict], MCItem]
    id_keys: tuple[str, ...] = ("id", "idx", "ind")


TASKS: dict[str, MCTask] = {
    "boolq": MCTask("aps/super_glue:boolq", "validation", _boolq),
    "rte": MCTask("nyu-mll/glue:rte", "validation", _rte),
    "hellaswag": MCTask("Rowan/hellaswag", "validation", _hellaswag),
    "winogrande": MCTask("allenai/winogrande:winogrande_xl", "validation", _winogrande),
    "arc_challenge": MCTask("allenai/ai2_arc:ARC-Challenge", "test", _arc),
    "openbookqa": MCTask("allenai/openbookqa:main", "test", _openbookqa),
}


def _generic_item(row: dict) -> MCItem:
    choices = _get(row, "choices")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise _RowError("'choices' must be a list of strings")
    contexts = row.get("contexts")
    if contexts is not None and (not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts)):
        raise _RowError("'contexts' must be a list of strings")
    context = _get(row, "context")
    if not isinstance(context, str):
        raise _RowError("'context' must be a string")
    return MCItem(
        context, tuple(choices), _int_label(_get(row, "label"), len(choices)),
        contexts=tuple(contexts) if contexts is not None else None,
    )


def items_from_rows(task: str, rows: Sequence[dict], source: str = "dataset") -> list[MCItem]:
    """MCItems from rows in the generic schema ({"context", "choices", "label"}) or the task's
    native hub columns. A bad row raises DatasetFormatError naming the source, row and problem."""
    from harmjax.data.records import DatasetFormatError

    spec = _task(task)
    items = []
    for number, row in enumerate(rows):
        try:
            generic = "context" in row and isinstance(row.get("choices"), list)
            item = _generic_item(row) if generic else spec.format_row(row)
        except (_RowError, ValueError) as e:
            raise DatasetFormatError(f"{source}, row {number} ({task}): {e}.") from None
        ident = next((row[k] for k in spec.id_keys if row.get(k) is not None), number)
        items.append(dataclasses.replace(item, id=str(ident)))
    return items


def _task(name: str) -> MCTask:
    key = name.lower().replace("-", "_")
    if key not in TASKS:
        raise ValueError(f"Unknown multiple-choice task {name!r}; known: {', '.join(TASKS)}.")
    return TASKS[key]


def load_mc_task(name: str, path: str | None = None, split: str | None = None, limit: int | None = None) -> list[MCItem]:
    """The items of a multiple-choice task, formatted as lm-evaluation-harness formats them.

    Args:
      name: boolq, rte, hellaswag, winogrande, arc_challenge or openbookqa.
      path: a local .jsonl/.json/.csv file (generic or native schema, see the module
        docstring), or None for the task's hub dataset (needs the hub or its cache).
      split: hub split; default validation (test for arc_challenge and openbookqa, whose
        test splits are labeled).
      limit: keep the first `limit` items.
    """
    from harmjax.data.records import read_records
    from harmjax.errors import HubUnavailableError

    spec = _task(name)
    source = path or spec.hub
    try:
        rows = read_records(source, split=split or spec.split)
    except HubUnavailableError as e:
        raise HubUnavailableError(
            f"{e} For task {name!r}, pass path= a local JSONL of the {spec.hub!r} rows or of "
            '{"context": str, "choices": [str], "label": int} objects.'
        ) from None
    if limit is not None:
        rows = rows[:limit]
    return items_from_rows(name, rows, source)
