"""The evaluation job behind `launch.evaluate`: harmfulness scores of generations, NLL
selectivity and utility of a (masked) model, each resumable, gathered in metrics.json.

Harmfulness: every record of `generations.jsonl` (from `launch.generate`: id, prompt, prefix,
response, category, mask_id, seed) is scored by the chosen evaluators (`finetuned`: the
StrongREJECT fine-tuned evaluator; `rubric`: the StrongREJECT rubric with a local judge model;
`refusal`: keyword refusal). The judged text is prefix + response. Each record plus its scores
is appended to `<output_dir>/scores.jsonl` as its chunk finishes; a rerun skips ids already
there, and judge models are loaded only when something is left to score.

Selectivity (`selectivity.harmful` and `.benign` set): response NLL of held-out reference pairs
under the base and the masked model (`harmjax.evaluate.selectivity`) -> `selectivity.json`.
Utility (`utility.*`): perplexity, zero-shot multiple choice, TriviaQA of the (masked) model;
each finished task is a line of `utility.jsonl`, so a rerun skips it.

`metrics.json` gathers it all: per mask id, overall and per category, the mean fine-tuned
score, the mean rubric score over parsable judgements and the count of unparsable ones
(never imputed), the keyword refusal rate; then selectivity and utility.

`cfg` is the job's config (`configs/evaluate_embedded.py`); `mesh` a `MeshConfig` for every
model the job loads.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging

from harmjax import distributed
from harmjax.sharding import MeshConfig

EVALUATORS = ("finetuned", "rubric", "refusal")
# The field each evaluator adds; a resumed scores file must carry those of the requested ones.
SCORE_FIELDS = {"finetuned": "finetuned_score", "rubric": "rubric_score", "refusal": "refusal"}

ScoreFn = Callable[[Sequence[str], Sequence[str]], list[dict[str, Any]]]


# ---------------------------------------------------------------------------------- harmfulness


def parse_evaluators(value: str | Sequence[str]) -> list[str]:
    """'finetuned,refusal' -> ['finetuned', 'refusal'], checking each name."""
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    unknown = [n for n in names if n not in EVALUATORS]
    if not names:
        raise ValueError(f"No evaluators given; choose from {', '.join(EVALUATORS)}.")
    if unknown:
        raise ValueError(f"Unknown evaluators {unknown}; choose from {', '.join(EVALUATORS)}.")
    return names


class LazyScorer:
    """An evaluator built on first use, so a finished run never loads a judge model."""

    def __init__(self, build: Callable[[], ScoreFn]):
        self._build, self._fn = build, None

    def __call__(self, prompts, texts):
        if self._fn is None:
            self._fn = self._build()
        return self._fn(prompts, texts)


def finetuned_scorer(base: str, adapter: str, template: str | None, *, dtype: Any = None,
                     mesh: Any = None, max_response_tokens: int = 512,
                     batch_size: int = 8) -> Callable[[Sequence[str], Sequence[str]], np.ndarray]:
    """The StrongREJECT fine-tuned evaluator (`load_finetuned_judge`) as a callable
    (prompts, judged texts) -> float32 scores in [0, 1]."""
    from harmjax.evaluate.strongreject_finetuned import load_finetuned_judge, score_finetuned

    judge = load_finetuned_judge(base, adapter, template, dtype=dtype, mesh=mesh,
                                 max_response_tokens=max_response_tokens)
    return lambda prompts, texts: score_finetuned(judge, prompts, texts, batch_size, progress=False)


def make_evaluators(cfg, names: Sequence[str], mesh: MeshConfig | None = None) -> dict[str, ScoreFn]:
    """Score functions (prompts, judged texts) -> per-item score dicts, by evaluator name."""

    def finetuned() -> ScoreFn:
        f = cfg.finetuned
        score = finetuned_scorer(f.base, f.adapter, f.template or None, dtype=f.dtype or None, mesh=mesh,
                                 max_response_tokens=f.max_response_tokens, batch_size=f.batch_size)
        return lambda prompts, texts: [{"finetuned_score": float(s)} for s in score(prompts, texts)]

    def rubric() -> ScoreFn:
        import harmjax
        from harmjax.assets import resolve_model_source
        from harmjax.evaluate.rubric import load_rubric_templates, local_judge, score_rubric

        r = cfg.rubric
        templates = load_rubric_templates(r.prompts_dir or None)
        model = harmjax.load(resolve_model_source(r.judge), dtype=r.dtype or None, mesh=mesh)
        judge = local_judge(model, max_new_tokens=r.max_new_tokens, batch_size=r.batch_size, progress=False)
        return lambda prompts, texts: [res.as_record() for res in score_rubric(judge, prompts, texts, templates)]

    def refusal() -> ScoreFn:
        from harmjax.evaluate.refusal import is_refusal, refusal_phrase

        k = cfg.refusal
        return lambda prompts, texts: [
            {"refusal": int(is_refusal(t, min_words=k.min_words, normalize_quotes=k.normalize_quotes)),
             "refusal_phrase": refusal_phrase(t, normalize_quotes=k.normalize_quotes)}
            for t in texts
        ]

    builders = {"finetuned": finetuned, "rubric": rubric, "refusal": refusal}
    return {name: LazyScorer(builders[name]) for name in names}


def read_generations(path: str) -> list[dict[str, Any]]:
    """The records of a generations JSONL, checked for the fields scoring needs and unique ids."""
    from harmjax.data.records import DatasetFormatError
    from harmjax.io.jsonl import read_jsonl

    records = read_jsonl(path)
    seen: set[Any] = set()
    for number, record in enumerate(records, start=1):
        missing = [k for k in ("id", "prompt", "response") if not isinstance(record.get(k), (str, int))]
        if missing:
            raise DatasetFormatError(f"{path}, record {number}: no {missing} field (or not a string).")
        if record["id"] in seen:
            raise DatasetFormatError(f"{path}, record {number}: duplicate id {record['id']!r}; ids must be unique.")
        seen.add(record["id"])
    return records


def judged_text(record: dict[str, Any], include_prefix: bool = True) -> str:
    """What the evaluators see: the prefilled prefix followed by the model's continuation."""
    prefix = (record.get("prefix") or "") if include_prefix else ""
    return prefix + str(record["response"])


def score_generations(
    generations: Sequence[dict[str, Any]],
    scores_path: str,
    evaluators: dict[str, ScoreFn],
    chunk_size: int = 32,
    include_prefix: bool = True,
) -> int:
    """Appends each not-yet-scored record plus its scores to `scores_path`; returns how many
    were scored now. Records already in the file are kept as they are."""
    from tqdm.auto import tqdm

    from harmjax.io.jsonl import JsonlWriter, read_jsonl

    if os.path.isfile(scores_path):
        _check_resumable(read_jsonl(scores_path), evaluators, scores_path)
    with JsonlWriter(scores_path, key="id") as out:
        todo = [r for r in generations if r["id"] not in out.done]
        logging.info("%d records, %d already scored in %s, %d to score.",
                     len(generations), len(generations) - len(todo), scores_path, len(todo))
        step = max(1, int(chunk_size))
        for start in tqdm(range(0, len(todo), step), desc="scoring", unit="chunk", disable=not todo):
            chunk = todo[start : start + step]
            prompts = [str(r["prompt"]) for r in chunk]
            texts = [judged_text(r, include_prefix) for r in chunk]
            results = [dict() for _ in chunk]
            for name, fn in evaluators.items():
                scores = fn(prompts, texts)
                if len(scores) != len(chunk):
                    raise RuntimeError(f"Evaluator {name} returned {len(scores)} results for {len(chunk)} items.")
                for row, s in zip(results, scores):
                    row.update(s)
            for record, row in zip(chunk, results):
                out.write({**record, **row, "evaluators": list(evaluators)})
        return len(todo)


def _check_resumable(done: list[dict[str, Any]], evaluators: dict[str, ScoreFn], path: str) -> None:
    for record in done:
        lacking = [name for name in evaluators if SCORE_FIELDS[name] not in record]
        if lacking:
            raise ValueError(
                f"{path} holds record {record.get('id')!r} scored without {lacking}; a resumed run must "
                f"request the same evaluators ({record.get('evaluators')}). Use another output_dir "
                "to score with different evaluators."
            )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_scores(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregates scored records: per mask id, overall and per category.

    For each group: n; finetuned_mean; rubric_mean over parsable judgements, rubric_unparsed
    (count of NaN scores) and rubric_refused_rate; refusal_rate (keyword). Fields of an
    evaluator that was not run are absent.
    """

    def stats(group: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"n": len(group)}
        if any("finetuned_score" in r for r in group):
            out["finetuned_mean"] = _mean([r["finetuned_score"] for r in group if r.get("finetuned_score") is not None])
        if any("rubric_score" in r for r in group):
            parsed = [r for r in group if r.get("rubric_parsed")]
            out["rubric_mean"] = _mean([r["rubric_score"] for r in parsed])
            out["rubric_unparsed"] = sum(1 for r in group if "rubric_score" in r and not r.get("rubric_parsed"))
            out["rubric_refused_rate"] = _mean([float(r["rubric_refused"]) for r in parsed])
        if any("refusal" in r for r in group):
            out["refusal_rate"] = _mean([float(r["refusal"]) for r in group if r.get("refusal") is not None])
        return out

    def with_categories(group: list[dict[str, Any]]) -> dict[str, Any]:
        by_cat: dict[str, list[dict[str, Any]]] = {}
        for r in group:
            by_cat.setdefault(str(r.get("category") or "none"), []).append(r)
        return {"all": stats(group), "by_category": {c: stats(g) for c, g in sorted(by_cat.items())}}

    by_mask: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_mask.setdefault(str(r.get("mask_id") or "none"), []).append(r)
    return {
        "all": stats(list(records)),
        "by_mask": {m: with_categories(g) for m, g in sorted(by_mask.items())},
        "seeds": sorted({r.get("seed") for r in records if r.get("seed") is not None}),
    }


# ---------------------------------------------------------------------------------- subject model


def load_subject(cfg, mesh: MeshConfig | None = None):
    """(model, pruned params, mask id) of the model under evaluation; the params are the base
    params when no mask is given."""
    import harmjax
    from harmjax.assets import resolve_model_source

    model = harmjax.load(resolve_model_source(cfg.model), dtype=cfg.dtype or None, mesh=mesh)
    if not cfg.mask:
        return model, model.params, "none"
    from harmjax.masks.apply import apply_mask
    from harmjax.masks.storage import load_mask

    mask, _ = load_mask(cfg.mask, params=model.params)
    return model, apply_mask(model.params, mask, alpha=cfg.mask_alpha), os.path.basename(os.path.normpath(cfg.mask))


def reference_examples(path: str, s, seed: int) -> list:
    """The harmful or benign reference pairs of a selectivity run (seeded sample of `s.limit`)."""
    from harmjax.data.records import read_records, sample, to_examples

    examples, _ = to_examples(
        read_records(path), prompt_key=s.prompt_key, response_key=s.response_key,
        on_bad="skip" if s.skip_bad_rows else "error", source=path,
    )
    return sample(examples, s.limit or None, seed) if s.limit else examples


def run_selectivity(cfg, model, pruned_params, mask_id: str, out_dir: str) -> dict[str, Any]:
    """NLL selectivity, written to selectivity.json; reused when that file has the same settings."""
    from harmjax.evaluate.selectivity import nll_selectivity

    s = cfg.selectivity
    settings = {
        "model": model.source_dir, "mask": cfg.mask, "mask_alpha": cfg.mask_alpha, "harmful": s.harmful,
        "benign": s.benign, "prompt_key": s.prompt_key, "response_key": s.response_key, "limit": s.limit,
        "text_format": s.text_format, "max_length": s.max_length, "seed": cfg.seed,
    }
    path = os.path.join(out_dir, "selectivity.json")
    if os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f)
        if previous.get("settings") == settings:
            logging.info("Selectivity already in %s; not recomputed.", path)
            return previous
    harmful = reference_examples(s.harmful, s, cfg.seed)
    benign = reference_examples(s.benign, s, cfg.seed)
    report = nll_selectivity(
        model, harmful, benign, pruned_params=pruned_params if cfg.mask else None,
        text_format=s.text_format, batch_size=s.batch_size, max_length=s.max_length,
        n_boot=s.n_boot, seed=cfg.seed,
    )
    report.update(mask_id=mask_id, settings=settings)
    write_json(path, report)
    return report


def parse_mc_paths(value: str) -> dict[str, str]:
    """'boolq=/data/boolq.jsonl,rte=/data/rte.jsonl' -> {task: local file}; empty entries skipped."""
    return dict(p.split("=", 1) for p in (value or "").split(",") if p.strip())


def utility_tasks(u) -> list[str]:
    """The utility tasks a config asks for: perplexity, mc/<task>..., triviaqa."""
    tasks = ["perplexity"] if u.perplexity else []
    tasks += [f"mc/{t.strip()}" for t in u.mc_tasks.split(",") if t.strip()]
    return tasks + (["triviaqa"] if u.triviaqa else [])


def run_utility(cfg, model, pruned_params, mask_id: str, out_dir: str) -> dict[str, Any]:
    """Each utility task on the (masked) model, and on the base model too with `compare_base`;
    every finished (task, condition) is a line of utility.jsonl and is not redone."""
    from harmjax.evaluate import utility
    from harmjax.io.jsonl import JsonlWriter, read_jsonl

    u = cfg.utility
    conditions = {mask_id: pruned_params}
    if cfg.mask and u.compare_base:
        conditions["none"] = model.params
    mc_paths = parse_mc_paths(u.mc_paths)
    path = os.path.join(out_dir, "utility.jsonl")
    with JsonlWriter(path, key="key") as out:
        for task in utility_tasks(u):
            for condition, params in conditions.items():
                key = f"{task}@{condition}"
                if key in out.done:
                    continue
                t0 = time.perf_counter()
                if task == "perplexity":
                    texts = utility.load_text_corpus(u.perplexity)
                    result = utility.perplexity(model, texts, max_length=u.ppl_max_length, batch_size=u.batch_size, params=params)
                elif task.startswith("mc/"):
                    name = task[3:]
                    items = utility.load_mc_task(name, path=mc_paths.get(name), limit=u.limit or None)
                    result = utility.multiple_choice_accuracy(model, items, batch_size=u.batch_size, params=params)
                else:
                    items = utility.load_triviaqa(path=u.triviaqa_path or None, limit=u.limit or None)
                    result = utility.triviaqa_accuracy(model.with_params(params), items, max_new_tokens=u.triviaqa_max_new_tokens)
                out.write({"key": key, "task": task, "mask_id": condition, "seconds": time.perf_counter() - t0, **result})
                logging.info("utility %s: %s", key, {k: v for k, v in result.items() if k != "per_item"})
    return {
        r["key"]: {k: v for k, v in r.items() if k not in ("key", "per_item")} for r in read_jsonl(path)
    }


# ---------------------------------------------------------------------------------- job


def json_safe(value: Any) -> Any:
    """NaN and infinities become null (arrays become lists), so the result is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    return value


def write_json(path: str, data: dict[str, Any]) -> None:
    """Writes `json_safe(data)` through a temporary file; process 0 writes, all wait."""
    if distributed.is_writer():  # every process computed `data`; one writes
        tmp = f"{path}.partial"
        with open(tmp, "w") as f:
            json.dump(json_safe(data), f, indent=2)
        os.replace(tmp, path)
    distributed.barrier(f"wrote {path}")


def run_evaluation(cfg, mesh: MeshConfig | None = None) -> dict[str, Any]:
    """The whole evaluation job; returns the metrics also written to metrics.json."""
    from harmjax.io.jsonl import read_jsonl

    start = time.perf_counter()
    if not cfg.output_dir and not cfg.generations:
        raise ValueError("Set output_dir (or generations, whose directory is then used).")
    out_dir = cfg.output_dir or os.path.dirname(os.path.abspath(cfg.generations))
    os.makedirs(out_dir, exist_ok=True)
    metrics: dict[str, Any] = {"output_dir": out_dir}
    if cfg.generations:
        names = parse_evaluators(cfg.evaluators)
        scores_path = os.path.join(out_dir, "scores.jsonl")
        scored_now = score_generations(
            read_generations(cfg.generations), scores_path, make_evaluators(cfg, names, mesh),
            cfg.chunk_size, cfg.include_prefix,
        )
        metrics.update(
            generations=os.path.abspath(cfg.generations), evaluators=names, scored_this_run=scored_now,
            harm=summarize_scores(read_jsonl(scores_path)),
        )
    wants_selectivity = bool(cfg.selectivity.harmful or cfg.selectivity.benign)
    if wants_selectivity and not (cfg.selectivity.harmful and cfg.selectivity.benign):
        raise ValueError("Selectivity needs both selectivity.harmful and selectivity.benign.")
    if wants_selectivity or utility_tasks(cfg.utility):
        model, pruned, mask_id = load_subject(cfg, mesh)
        if wants_selectivity:
            metrics["selectivity"] = {
                k: v for k, v in run_selectivity(cfg, model, pruned, mask_id, out_dir).items() if k != "settings"
            }
        if utility_tasks(cfg.utility):
            metrics["utility"] = run_utility(cfg, model, pruned, mask_id, out_dir)
    metrics["wall_s"] = time.perf_counter() - start
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    logging.info("Wrote %s", os.path.join(out_dir, "metrics.json"))
    return metrics
