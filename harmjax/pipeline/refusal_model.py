"""A refusal-tuned variant of a chat model, made by harmjax (issue 13), as cached stages:

  prompts (the main job's split; its held-out prompts never trained on)
  -> answers   the model's own greedy answers to benign instructions
  -> tune      LoRA (or full) fine-tuning on harmful prompts paired with refusal texts plus the
               benign answers; the merged model written once as an HF directory
  -> evaluation  (run_refusal_tuning only) held-out refusal rates, a judge-free log-probability
               measure, the prefilling attack and benign NLL, before and after
  -> report    report.md, metrics.json, refusal_summary.png

The paper's claims concern aligned models; the embedded SmolLM2-135M-Instruct answers most
harmful prompts, so harmjax aligns it itself. `ensure_refusal_model(cfg)` returns the merged
model's directory (a `model=` source for `run_experiment`); `run_refusal_tuning(cfg)` also
measures it. Settings: configs/refusal_embedded.py. A kill during training resumes from the
fine-tuning checkpoints; a kill after the model is written does not retrain.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any

from harmjax import distributed
from harmjax.pipeline import answers as answers_mod
from harmjax.pipeline.refusal_data import (
    OPENING_SUFFIX, RefusalSplit, answer_examples, check_disjoint, main_job_heldout, opening_copies, refusal_examples, split_prompts,
)
from harmjax.pipeline.stages import (
    StageCache, as_config, default_run_dir, fresh_dir, read_json, settings_key, write_json_atomic,
)

MODELS = ("original", "refusal_tuned")


@dataclasses.dataclass
class _Prepared:
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
    base: "_Base"


class _Base:
    """The base model's config and tokenizer at once (they key the stages), its weights only
    when a stage has work to do: a cached run does not load them."""

    def __init__(self, source: str, cfg):
        from harmjax.config import ModelConfig, hf_config_from_dict
        from harmjax.io import hf as hf_io
        from harmjax.loading import gguf_as_hf_dir, load_tokenizer

        path = hf_io.resolve_checkpoint(source)
        directory = gguf_as_hf_dir(path) if path.endswith(".gguf") else path
        self.config = ModelConfig.from_hf(hf_config_from_dict(hf_io.read_config_json(directory)))
        self.tokenizer = load_tokenizer(directory)
        self.source, self.cfg, self._model = source, cfg, None

    @property
    def model(self):
        if self._model is None:
            import harmjax
            from harmjax.sharding import MeshConfig

            self._model = harmjax.load(self.source, dtype=self.cfg.dtype, mesh=MeshConfig(**dict(self.cfg.mesh)))
        return self._model


def ensure_refusal_model(cfg, progress: bool = True, experiment_cfg=None) -> str:
    """The directory of the refusal-tuned model of `cfg` (configs/refusal_embedded.py), made
    on first use and reused after: an HF checkpoint (safetensors, config, tokenizer) that
    `harmjax.load` and transformers read, e.g. `experiment_cfg.model = ensure_refusal_model(cfg)`.

    With `experiment_cfg` (a `run_experiment` config), also checks that none of that
    experiment's held-out prompts was trained on (ValueError otherwise).
    """
    return _prepare(cfg, progress, experiment_cfg).model_dir


def run_refusal_tuning(cfg, progress: bool = True) -> dict[str, Any]:
    """Makes (or reuses) the refusal-tuned model, measures it against the original on held-out
    prompts, writes report.md, metrics.json and a plot in the run directory; returns the metrics."""
    t_start = time.perf_counter()
    p = _prepare(as_config(cfg), progress)
    cfg, E = p.cfg, p.cfg.evaluation
    common = {"evaluation": E.to_dict(), "heldout": [e.id for e in p.split.heldout],
              "benign_heldout": [e.id for e in p.split.benign_heldout], "answers": os.path.basename(p.answers_dir)}
    # One stage per model: the original's measurements do not depend on the tuning settings,
    # so retuning re-measures only the tuned model.
    keys = {"original": common, "refusal_tuned": {**common, "tune": os.path.basename(os.path.dirname(p.model_dir))}}

    def evaluate_stage(name):
        def compute(d):
            import harmjax
            from harmjax.pipeline.refusal_eval import measure_refusal

            model = p.base.model
            rows = answers_mod.read_rows(os.path.join(p.answers_dir, "benign.jsonl"))
            held_ids = {e.id for e in p.split.benign_heldout}
            benign_nll_set = answer_examples(model.tokenizer, [r for r in rows if r["id"] in held_ids],
                                             cfg.answers.max_new_tokens, E.max_length)
            params = model.params if name == "original" else harmjax.load(
                p.model_dir, dtype=cfg.dtype, mesh=model.mesh).params
            benign_prompts = list(p.split.benign_heldout) if E.benign_generations else []
            r = measure_refusal(model, params, p.split.heldout, {e.id for e in p.split.main_heldout},
                                benign_nll_set, benign_prompts, E)
            write_json_atomic(os.path.join(d, "results.json"), r)
            return {"benign_nll_examples": len(benign_nll_set)}
        return compute

    results, ev_info = {}, {}
    for name in MODELS:
        ev_info = p.stages.run(f"evaluate_{name}", keys[name], evaluate_stage(name))
        results[name] = read_json(os.path.join(p.stages.path(f"evaluate_{name}", keys[name]), "results.json"))

    from harmjax.pipeline.refusal_report import write_refusal_report

    data = {**p.data, "benign_nll_examples": ev_info["benign_nll_examples"]}
    return write_refusal_report(p.run_dir, cfg=cfg, source=p.source, model_dir=p.model_dir, data=data,
                                training=p.training, results=results, timings=p.stages.timings,
                                wall_seconds=time.perf_counter() - t_start)


def _prepare(cfg, progress: bool, experiment_cfg=None) -> _Prepared:
    from harmjax.assets import resolve_model_source
    from harmjax.data.refusal_set import load_refusals

    cfg = as_config(cfg)
    source = resolve_model_source(cfg.model)
    run_dir = cfg.output_dir or default_run_dir(source, "refusal")
    os.makedirs(run_dir, exist_ok=True)
    stages = StageCache(run_dir)
    base = _Base(source, cfg)
    model_id = {"source": source, "config": repr(base.config), "dtype": cfg.dtype}

    split = split_prompts(cfg)
    if experiment_cfg is not None:  # the experiment this model is made for holds out the same prompts
        held_h, held_b = main_job_heldout(as_config(experiment_cfg).prompts, as_config(experiment_cfg).seed)
        check_disjoint(split.train + split.benign_train, held_h + held_b)
    write_json_atomic(os.path.join(run_dir, "prompts.json"), {
        "train": [e.id for e in split.train], "heldout": [e.id for e in split.heldout],
        "main_heldout": [e.id for e in split.main_heldout], "benign_train": [e.id for e in split.benign_train],
        "benign_heldout": [e.id for e in split.benign_heldout],
        "main_benign_heldout": [e.id for e in split.main_benign_heldout]})

    # --- the model's own answers to the benign instructions (train: utility; held out: NLL) ---
    A = cfg.answers
    benign_all = split.benign_train + split.benign_heldout
    ans_settings = {"model": model_id, "benign": [e.id for e in benign_all], "benign_source": cfg.prompts.benign,
                    **A.to_dict()}

    def answer_stage(d):
        rows = answers_mod.generate_answers(
            base.model, benign_all, os.path.join(d, "benign.jsonl"), attack_refusals=False,
            max_new_tokens=A.max_new_tokens, batch_size=A.batch_size, chat=True, chunk=A.chunk, min_words=0,
            desc="benign answers")
        return {"benign": len(rows), "finished": sum(r["tokens"] < A.max_new_tokens for r in rows)}

    ans_info = stages.run("answers", ans_settings, answer_stage)
    answers_dir = stages.path("answers", ans_settings)

    # --- training examples: refusals for harmful prompts, own answers for benign ones -------
    T = cfg.train
    refusals = load_refusals(cfg.data.refusals or None)
    harmful_ex, dropped = refusal_examples(base.tokenizer, split.train, [r.text for r in refusals], cfg.seed,
                                           T.max_length)
    train_b = {e.id for e in split.benign_train}
    rows = [r for r in answers_mod.read_rows(os.path.join(answers_dir, "benign.jsonl")) if r["id"] in train_b]
    benign_ex = answer_examples(base.tokenizer, rows, A.max_new_tokens, T.max_length)
    if cfg.data.benign_openings:
        benign_ex += opening_copies(base.tokenizer, rows, cfg.data.benign_openings)
    examples = harmful_ex + benign_ex
    # Every example comes from a training prompt (split_prompts checked those against the
    # held-out ones, by id and text); opening copies carry their answer's id plus a suffix.
    allowed = {e.id for e in split.train + split.benign_train}
    strays = sorted({e.id for e in examples if e.id.removesuffix(OPENING_SUFFIX) not in allowed})
    if strays:
        raise ValueError(f"Training examples from outside the training prompts: {strays[:5]}.")
    tune_settings = {"answers": settings_key(ans_settings), "examples": _digest(examples),
                     "train": T.to_dict(), "lora": cfg.lora.to_dict()}
    name = f"{os.path.basename(os.path.normpath(source))}-refusal"
    training = stages.run("tune", tune_settings,
                          lambda d: _tune(base, cfg, examples, d, name, progress))
    data = {"harmful_train_prompts": len(split.train), "harmful_train_examples": len(harmful_ex),
            "harmful_dropped_too_long": dropped, "benign_train_examples": len(benign_ex),
            "heldout_prompts": len(split.heldout), "main_heldout_prompts": len(split.main_heldout),
            "benign_heldout_prompts": len(split.benign_heldout), "refusal_texts": len(refusals),
            "benign_answers": ans_info["benign"], "benign_answers_finished": ans_info["finished"]}
    return _Prepared(cfg, source, run_dir, stages, split, os.path.join(stages.path("tune", tune_settings), name),
                     answers_dir, data, training, base)


def _tune(base: _Base, cfg, examples, directory: str, name: str, progress: bool) -> dict[str, Any]:
    """Fine-tunes (resuming from directory/train) and writes the merged model to
    directory/<name> by a rename, so the directory exists only complete."""
    from harmjax.pipeline.emergent_experiment import lora_config, train_config
    from harmjax.train import export_merged, export_peft, finetune

    info_path, model_dir = os.path.join(directory, "train_info.json"), os.path.join(directory, name)
    if os.path.isdir(model_dir) and os.path.isfile(info_path):  # killed after the model was written
        return read_json(info_path)
    if distributed.is_writer():  # what was trained on, for audits (and the tests)
        with open(os.path.join(directory, "training_data.jsonl"), "w") as f:
            for e in examples:
                f.write(json.dumps({"id": e.id, "category": e.category, "prompt": e.prompt, "response": e.response}) + "\n")
    model, lora = base.model, lora_config(cfg.lora)
    result = finetune(model, examples, train_config(cfg.train), lora=lora, output_dir=os.path.join(directory, "train"),
                      progress=progress, tensorboard=cfg.tensorboard)
    info = {"steps": result.steps, "train_loss": result.train_loss, "val_loss": result.val_loss,
            "seconds": result.seconds, "resumed_from": result.resumed_from, "examples": len(examples)}
    if lora is not None:
        export_peft(result.adapters, lora, os.path.join(directory, "peft"), base_model_name_or_path=cfg.model)
    write_json_atomic(info_path, info)
    tmp = fresh_dir(model_dir)
    export_merged(model, result.params, tmp)
    if distributed.is_writer():
        if os.path.isdir(model_dir):  # a copy without its train_info.json: replace it
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
    distributed.barrier(f"wrote {model_dir}")
    return info


def _digest(examples) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.id}\x00{e.prompt}\x00{e.response}\x01".encode())
    return h.hexdigest()[:16]


__all__ = ["ensure_refusal_model", "run_refusal_tuning"]
