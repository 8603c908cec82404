"""A refusal-tuned variant of a chat model, made by harmjax (issue 13), as cached stages:

  prompts (the main job's split; its held-out prompts never trained on)
  -> answers   the model's own greedy answers to benign instructions
  -> tune      LoRA (or full) fine-tuning on harmful prompts paired with refusal texts plus the
               benign answers; the merged model written once as an HF directory
  -> evaluation  (run_refusal_tuning only) held-out refusal rates, a judge-free log-probability
               measure, the prefilling attack and benign NLL, before and after
  -> over_refusal  (run_refusal_tuning only) refusals of harmless prompts that only sound
               harmful, and of their unsafe contrasts, before and after
  -> report    report.md, metrics.json, refusal_summary.png

The paper's claims concern aligned models; the embedded SmolLM2-135M-Instruct answers most
harmful prompts, so harmjax aligns it itself. `ensure_refusal_model(cfg)` returns the merged
model's directory (a `model=` source for `run_experiment`); `run_refusal_tuning(cfg)` also
measures it. Settings: configs/refusal_embedded.py. A kill during training resumes from the
fine-tuning checkpoints; a kill after the model is written does not retrain.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from harmjax.experiments.core import answers as answers_mod
from harmjax.experiments.core.stages import (
    StageCache, as_config, default_run_dir, examples_digest, read_json, settings_key, write_json_atomic,
)
from harmjax.experiments.refusal.data import (
    OPENING_SUFFIX, RefusalSplit, answer_examples, check_disjoint, main_job_heldout, opening_copies, refusal_examples,
    split_prompts,
)
from harmjax.experiments.refusal.eval import MODELS
from harmjax.experiments.refusal.tuning import BaseModel, tune


@dataclasses.dataclass
class Prepared:
    """What the tuning stages leave for the evaluation: paths, data and lazily the base model."""

    cfg: Any
    source: str
    run_dir: str
    stages: StageCache
    split: RefusalSplit
    model_dir: str
    answers_dir: str
    data: dict[str, Any]
    training: dict[str, Any]
    base: BaseModel


def ensure_refusal_model(cfg, progress: bool = True, experiment_cfg=None) -> str:
    """The directory of the refusal-tuned model of `cfg` (configs/refusal_embedded.py), made
    on first use and reused after: an HF checkpoint (safetensors, config, tokenizer) that
    `harmjax.load` and transformers read, e.g. `experiment_cfg.model = ensure_refusal_model(cfg)`.

    With `experiment_cfg` (a `run_experiment` config), also checks that none of that
    experiment's held-out prompts was trained on (ValueError otherwise).
    """
    return prepare(cfg, progress, experiment_cfg).model_dir


def run_refusal_tuning(cfg, progress: bool = True) -> dict[str, Any]:
    """Makes (or reuses) the refusal-tuned model, measures it against the original on held-out
    prompts, writes report.md, metrics.json and a plot in the run directory; returns the metrics."""
    t_start = time.perf_counter()
    p = prepare(as_config(cfg), progress)
    results, benign_nll_examples = evaluation_stages(p)
    over_refusal = over_refusal_stages(p)
    from harmjax.experiments.refusal.report import write_refusal_report

    data = {**p.data, "benign_nll_examples": benign_nll_examples}
    return write_refusal_report(p.run_dir, cfg=p.cfg, source=p.source, model_dir=p.model_dir, data=data,
                                training=p.training, results=results, timings=p.stages.timings,
                                wall_seconds=time.perf_counter() - t_start, over_refusal=over_refusal)


def evaluation_stages(p: Prepared) -> tuple[dict[str, Any], int]:
    """One stage per model ({name: results}, benign NLL examples): the original's measurements
    do not depend on the tuning settings, so retuning re-measures only the tuned model."""
    cfg, eval_cfg = p.cfg, p.cfg.evaluation
    common = {"evaluation": eval_cfg.to_dict(), "heldout": [e.id for e in p.split.heldout],
              "benign_heldout": [e.id for e in p.split.benign_heldout], "answers": os.path.basename(p.answers_dir)}
    keys = {"original": common, "refusal_tuned": {**common, "tune": os.path.basename(os.path.dirname(p.model_dir))}}

    def evaluate_stage(name):
        def compute(d):
            import harmjax
            from harmjax.experiments.refusal.eval import measure_refusal

            model = p.base.model
            rows = answers_mod.read_rows(os.path.join(p.answers_dir, "benign.jsonl"))
            held_ids = {e.id for e in p.split.benign_heldout}
            benign_nll_set = answer_examples(model.tokenizer, [r for r in rows if r["id"] in held_ids],
                                             cfg.answers.max_new_tokens, eval_cfg.max_length)
            params = model.params if name == "original" else harmjax.load(
                p.model_dir, dtype=cfg.dtype, mesh=model.mesh).params
            benign_prompts = list(p.split.benign_heldout) if eval_cfg.benign_generations else []
            r = measure_refusal(model, params, p.split.heldout, {e.id for e in p.split.main_heldout},
                                benign_nll_set, benign_prompts, eval_cfg)
            write_json_atomic(os.path.join(d, "results.json"), r)
            return {"benign_nll_examples": len(benign_nll_set)}
        return compute

    results, ev_info = {}, {}
    for name in MODELS:
        ev_info = p.stages.run(f"evaluate_{name}", keys[name], evaluate_stage(name))
        results[name] = read_json(os.path.join(p.stages.path(f"evaluate_{name}", keys[name]), "results.json"))
    return results, ev_info["benign_nll_examples"]


def over_refusal_stages(p: Prepared) -> dict[str, Any] | None:
    """{model name: over-refusal result} (`harmjax.experiments.core.over_refusal`), one stage per
    model as in `evaluation_stages`; None when off (or in a config written before it existed)."""
    block = p.cfg.get("over_refusal")
    if block is None or not block.enabled:
        return None
    from harmjax.experiments.core.over_refusal import over_refusal_prompts, over_refusal_units

    prompts = over_refusal_prompts(block, p.cfg.seed)
    common = {**block.to_dict(), "seed": p.cfg.seed, "answers": os.path.basename(p.answers_dir),
              "prompts": examples_digest(prompts, ("id", "kind", "label", "prompt"))}
    keys = {"original": common, "refusal_tuned": {**common, "tune": os.path.basename(os.path.dirname(p.model_dir))}}

    def params_of(name):
        import harmjax

        model = p.base.model
        return model.params if name == "original" else harmjax.load(p.model_dir, dtype=p.cfg.dtype, mesh=model.mesh).params

    def get_model():
        return p.base.model  # loaded on first use: a cached run loads nothing

    out = {}
    for name in MODELS:
        named = {name: lambda name=name: params_of(name)}
        p.stages.run(f"over_refusal_{name}", keys[name],
                     lambda d, named=named: {"n": len(over_refusal_units(d, named, get_model, prompts, block))})
        out.update(over_refusal_units(p.stages.path(f"over_refusal_{name}", keys[name]), named, get_model, prompts,
                                      block))
    return out


def prepare(cfg, progress: bool, experiment_cfg=None) -> Prepared:
    """Runs (or finds cached) the stages that make the tuned model: the prompt split, the
    model's benign answers, the tuning."""
    from harmjax.assets import resolve_model_source

    cfg = as_config(cfg)
    source = resolve_model_source(cfg.model)
    run_dir = cfg.output_dir or default_run_dir(source, "refusal")
    os.makedirs(run_dir, exist_ok=True)
    stages = StageCache(run_dir)
    base = BaseModel(source, cfg)
    split = _split(cfg, run_dir, experiment_cfg)
    ans_settings, ans_info = _answer_stage(cfg, stages, base, source, split)
    answers_dir = stages.path("answers", ans_settings)
    examples, counts = _training_examples(cfg, base, split, answers_dir)
    tune_settings = {"answers": settings_key(ans_settings),
                     "examples": examples_digest(examples, ("id", "prompt", "response")),
                     "train": cfg.train.to_dict(), "lora": cfg.lora.to_dict()}
    name = f"{os.path.basename(os.path.normpath(source))}-refusal"
    training = stages.run("tune", tune_settings, lambda d: tune(base, cfg, examples, d, name, progress))
    data = {"harmful_train_prompts": len(split.train), "harmful_train_examples": counts["harmful"],
            "harmful_dropped_too_long": counts["dropped"], "benign_train_examples": counts["benign"],
            "heldout_prompts": len(split.heldout), "main_heldout_prompts": len(split.main_heldout),
            "benign_heldout_prompts": len(split.benign_heldout), "refusal_texts": counts["refusal_texts"],
            "benign_answers": ans_info["benign"], "benign_answers_finished": ans_info["finished"]}
    return Prepared(cfg, source, run_dir, stages, split, os.path.join(stages.path("tune", tune_settings), name),
                    answers_dir, data, training, base)


def _split(cfg, run_dir: str, experiment_cfg) -> RefusalSplit:
    """The prompt split (checked against `experiment_cfg`'s held-out prompts), written to prompts.json."""
    split = split_prompts(cfg)
    if experiment_cfg is not None:  # the experiment this model is made for holds out the same prompts
        held_h, held_b = main_job_heldout(as_config(experiment_cfg).prompts, as_config(experiment_cfg).seed)
        check_disjoint(split.train + split.benign_train, held_h + held_b)
    write_json_atomic(os.path.join(run_dir, "prompts.json"), {
        "train": [e.id for e in split.train], "heldout": [e.id for e in split.heldout],
        "main_heldout": [e.id for e in split.main_heldout], "benign_train": [e.id for e in split.benign_train],
        "benign_heldout": [e.id for e in split.benign_heldout],
        "main_benign_heldout": [e.id for e in split.main_benign_heldout]})
    return split


def _answer_stage(cfg, stages: StageCache, base: BaseModel, source: str, split: RefusalSplit):
    """The model's own answers to the benign instructions (train: utility; held out: NLL):
    (the stage's settings, its info)."""
    answers_cfg = cfg.answers
    model_id = {"source": source, "config": repr(base.config), "dtype": cfg.dtype}
    benign_all = split.benign_train + split.benign_heldout
    ans_settings = {"model": model_id, "benign": [e.id for e in benign_all], "benign_source": cfg.prompts.benign,
                    **answers_cfg.to_dict()}

    def answer_stage(d):
        rows = answers_mod.generate_answers(
            base.model, benign_all, os.path.join(d, "benign.jsonl"), attack_refusals=False,
            max_new_tokens=answers_cfg.max_new_tokens, batch_size=answers_cfg.batch_size, chat=True,
            chunk=answers_cfg.chunk, min_words=0, desc="benign answers")
        return {"benign": len(rows), "finished": sum(r["tokens"] < answers_cfg.max_new_tokens for r in rows)}

    return ans_settings, stages.run("answers", ans_settings, answer_stage)


def _training_examples(cfg, base: BaseModel, split: RefusalSplit, answers_dir: str):
    """Refusals for harmful prompts, own answers for benign ones: (examples, counts)."""
    from harmjax.data.refusal_set import load_refusals

    max_length = cfg.train.max_length
    refusals = load_refusals(cfg.data.refusals or None)
    harmful_ex, dropped = refusal_examples(base.tokenizer, split.train, [r.text for r in refusals], cfg.seed,
                                           max_length)
    train_b = {e.id for e in split.benign_train}
    rows = [r for r in answers_mod.read_rows(os.path.join(answers_dir, "benign.jsonl")) if r["id"] in train_b]
    benign_ex = answer_examples(base.tokenizer, rows, cfg.answers.max_new_tokens, max_length)
    if cfg.data.benign_openings:
        benign_ex += opening_copies(base.tokenizer, rows, cfg.data.benign_openings)
    examples = harmful_ex + benign_ex
    # Every example comes from a training prompt (split_prompts checked those against the
    # held-out ones, by id and text); opening copies carry their answer's id plus a suffix.
    allowed = {e.id for e in split.train + split.benign_train}
    strays = sorted({e.id for e in examples if e.id.removesuffix(OPENING_SUFFIX) not in allowed})
    if strays:
        raise ValueError(f"Training examples from outside the training prompts: {strays[:5]}.")
    return examples, {"harmful": len(harmful_ex), "dropped": dropped, "benign": len(benign_ex),
                      "refusal_texts": len(refusals)}


__all__ = ["MODELS", "ensure_refusal_model", "run_refusal_tuning"]
