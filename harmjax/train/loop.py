"""`finetune`: the resumable fine-tuning loop (full or LoRA/rsLoRA, optionally on a pruned model).

Everything a resume needs lives in `output_dir/checkpoints/step_<n>` (written by
`harmjax.checkpoint.save_tree`, the latest two kept): the trainable tree, the optimizer state,
the step, the PRNG key, the data position, and a fingerprint of the settings and data. Running
`finetune` again with the same `output_dir` continues from the latest checkpoint and, because
the data order and dropout keys are functions of the step number, ends with the same
parameters as an uninterrupted run. A resume with other settings or data raises
`FinetuneResumeError` naming what changed. After SIGTERM (with `harmjax.preemption`'s handler
installed) the loop checkpoints the step just done and raises `PreemptedError`.

Per-step metrics go to `output_dir/metrics.jsonl` (and TensorBoard scalars under
`output_dir/tb` when asked).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from harmjax import distributed, preemption
from harmjax.checkpoint import read_metadata, restore_tree, save_tree
from harmjax.data.records import Example
from harmjax.errors import HarmjaxError
from harmjax.io.jsonl import read_jsonl
from harmjax.masks.apply import check_mask_fits
from harmjax.sharding import batch_divisor, batch_sharding, param_shardings, replicated
from harmjax.train import data as train_data
from harmjax.train.events import EventWriter
from harmjax.train.lora import LoraConfig, adapter_shardings, init_lora, mask_plans, merge_adapters
from harmjax.train.optim import TrainConfig, lr_schedule, make_optimizer, trainable_names
from harmjax.train.step import (
    StepSpec, init_state, make_eval_step, make_train_step, stacked_batch_sharding,
)
from harmjax.tree import flatten, iter_leaves, unflatten

_CKPT = re.compile(r"^step_(\d{8})$")
# Settings that do not change the trained parameters; they may differ on resume.
_NON_RESULT_SETTINGS = ("eval_every", "checkpoint_every", "log_every")


class FinetuneResumeError(HarmjaxError, ValueError):
    """`output_dir` holds a checkpoint of a run with other settings or data."""


@dataclasses.dataclass
class FinetuneResult:
    """What `finetune` returns.

    Attributes:
      params: the fine-tuned params (LoRA merged; pruned weights exactly 0.0), model dtype.
      adapters: the float32 LoRA adapters (None for full fine-tuning).
      metrics: per-step dicts (step, loss, grad_norm, lr, tokens, ...; val_loss where evaluated),
        including the steps of earlier (resumed) runs read from metrics.jsonl.
      train_loss: loss of the last step.   val_loss: final validation loss (None: no split).
      steps: optimizer steps done in total.   tokens: response tokens trained on in this call.
      seconds: wall time of this call.   resumed_from: the step resumed from, or None.
    """

    params: dict[str, Any]
    adapters: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    train_loss: float | None
    val_loss: float | None
    steps: int
    tokens: int
    seconds: float
    resumed_from: int | None


def finetune(
    model,
    examples: Sequence[Example],
    train_cfg: TrainConfig,
    lora: LoraConfig | None = None,
    mask: Mapping[str, Any] | None = None,
    output_dir: str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    tensorboard: bool = False,
    memory_limit: int | None = None,
) -> FinetuneResult:
    """Fine-tunes `model` on `examples` with a response-only loss.

    Args:
      model: a `harmjax.Model` (params on model.mesh, tokenizer with a chat template for "chat").
      examples: `Example`s (prompt, response) or `ChatExample`s (loss on every assistant turn).
      train_cfg: optimizer, schedule, batching, split and cadence settings.
      lora: train rank-r adapters on the frozen model; None trains the params themselves
        (`train_cfg.train`: "linear" = the 7 projections of every block, or "all").
      mask: bool pytree (True = pruned) the params are already pruned with; pruned weights stay
        exactly 0.0 in the result.
      output_dir: metrics, checkpoints, TensorBoard files; rerunning with it resumes.
      progress: tqdm bar.
      stop_after: stop (with a checkpoint) once this global step is reached: an interruption.
      tensorboard: also write TensorBoard scalars under output_dir/tb.
      memory_limit: bytes per device to check the train step against before the first step
        (`harmjax.memory`; default $HARMJAX_DEVICE_MEMORY_LIMIT, else the device's own limit, no
        check on CPU). A step that cannot fit raises DeviceMemoryError; checkpoints are kept.
    """
    start_time = time.perf_counter()
    cfg, config, mesh = train_cfg, model.config, model.mesh
    div = batch_divisor(mesh)
    if cfg.micro_batch_size % div:
        raise ValueError(
            f"micro_batch_size {cfg.micro_batch_size} must be a multiple of the mesh's data x fsdp "
            f"extent {div}."
        )
    if tensorboard and not output_dir:
        raise ValueError("tensorboard=True needs an output_dir.")
    data = train_data.prepare(model.tokenizer, examples, cfg.batch_size, cfg.micro_batch_size,
                              cfg.max_length, cfg.val_fraction, cfg.seed, cfg.text_format)
    if len(data.train) == 0:
        raise ValueError("No training examples left after the validation split.")
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * data.steps_per_epoch
    p_sh = param_shardings(config, mesh)
    params = jax.device_put(model.params, p_sh)
    if mask is not None:
        check_mask_fits(params, mask)
        _check_pruned_zero(params, mask)

    # -------------------------------------------------------------- what is trained
    if lora is not None:
        t_sh = adapter_shardings(config, lora, mesh)
        trainable = init_lora(jax.random.PRNGKey(cfg.seed), config, lora, mesh)
        frozen, frozen_sh = params, p_sh
        aux = _place_plans(mask_plans(mask, config, lora), flatten(p_sh), mesh)
        spec = StepSpec(config, lora=lora, remat=cfg.remat)
    else:
        names = trainable_names(params, cfg.train)
        flat, flat_sh = flatten(params), flatten(p_sh)
        flat_mask = dict(iter_leaves(mask)) if mask is not None else {}
        t_sh = unflatten({n: flat_sh[n] for n in names})
        trainable = unflatten({n: _master(flat_sh[n])(flat[n], flat_mask.get(n)) for n in names})
        frozen = unflatten({n: x for n, x in flat.items() if n not in names})
        frozen_sh = unflatten({n: s for n, s in flat_sh.items() if n not in names})
        aux = unflatten({n: jax.device_put(flat_mask[n], flat_sh[n]) for n in names if n in flat_mask}) or None
        spec = StepSpec(config, dtypes=tuple((n, str(flat[n].dtype)) for n in names), remat=cfg.remat)
    aux_sh = jax.tree.map(lambda x: x.sharding, aux) if aux else None

    tx = make_optimizer(cfg, total, trainable)
    state, state_sh = init_state(tx, trainable, t_sh, mesh, cfg.seed)
    settings = _settings(cfg, lora, config, data, mask, total)

    resumed_from = None
    ckpt_root = os.path.join(output_dir, "checkpoints") if output_dir else None
    if ckpt_root:
        found = _latest_checkpoint(ckpt_root)
        if found:
            _check_settings(found, settings)
            state = _restore(found, state)
            resumed_from = int(jax.device_get(state["step"]))
            logging.info("finetune: resuming from %s (step %d).", found, resumed_from)
    start = int(jax.device_get(state["step"]))

    # Reuse the jitted steps of an earlier call with the same settings and shardings (a rerun in
    # a notebook, a resume): jit's cache is per function object, and these are built per call.
    cache_key = (spec, dataclasses.replace(cfg, **{k: 0 for k in _NON_RESULT_SETTINGS}), total,
                 *(_hashable(t) for t in (state_sh, frozen_sh, aux_sh)))
    if cache_key not in _STEP_CACHE:
        _STEP_CACHE.clear()  # keep one entry: each holds compiled executables
        _STEP_CACHE[cache_key] = (
            make_train_step(spec, tx, lr_schedule(cfg, total), mesh, state_sh, frozen_sh, aux_sh),
            make_eval_step(spec, mesh, t_sh, frozen_sh, aux_sh),
        )
    train_step, eval_step = _STEP_CACHE[cache_key]
    end = total if stop_after is None else min(total, max(start, stop_after))
    stacked_sh = stacked_batch_sharding(mesh)
    if start < end:  # before anything is written: a job that cannot fit changes nothing on disk
        knobs = (f"batch_size={cfg.batch_size}, micro_batch_size={cfg.micro_batch_size}, remat={cfg.remat}, "
                 f"mesh={dict(mesh.shape)}")
        _preflight(train_step, (state, frozen, aux), data, start, stacked_sh, mesh, knobs, memory_limit)

    def validate():
        if len(data.val) == 0:
            return None
        nll = count = 0.0
        for b in data.val_batches():
            s, c = eval_step(state["trainable"], frozen, aux, _feed(b, batch_sharding(mesh, 2)))
            nll, count = nll + float(s), count + float(c)
        return nll / max(count, 1.0)

    metrics_path = os.path.join(output_dir, "metrics.jsonl") if output_dir else None
    history = _read_metrics(metrics_path, upto=start) if metrics_path else []
    if metrics_path:
        os.makedirs(output_dir, exist_ok=True)
        _rewrite_metrics(metrics_path, history)
    # Every process computes the same metrics; process 0 alone writes them.
    writer = EventWriter(os.path.join(output_dir, "tb")) if tensorboard and distributed.is_writer() else None
    last_loss = history[-1].get("loss") if history else None
    tokens = 0
    bar = tqdm(total=total, initial=start, desc="finetune", disable=not progress, unit="step")

    def prepare(step):
        batch = data.step_batch(step)
        return batch, _feed(batch, stacked_sh)

    try:
        upcoming = prepare(start) if start < end else None
        for step in range(start, end):
            batch, on_device = upcoming
            t0 = time.perf_counter()
            state, m = train_step(state, frozen, aux, on_device)
            # The step runs asynchronously: build and send the next batch before waiting for
            # this step's metrics, so the device does not idle on host work between steps.
            upcoming = prepare(step + 1) if step + 1 < end else None
            row = {k: float(v) for k, v in jax.device_get(m).items()}
            row.update(step=step + 1, seconds=time.perf_counter() - t0,
                       input_tokens=int(batch["attention_mask"].sum()), **data.position(step))
            tokens += int(row["tokens"])
            last_loss = row["loss"]
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 and done < total:
                row["val_loss"] = validate()
            if done == total:
                row["val_loss"] = validate()
            history.append(row)
            if metrics_path and (not cfg.log_every or done % cfg.log_every == 0 or "val_loss" in row or done == end):
                _append_metrics(metrics_path, row)
            if writer:
                writer.scalars(done, {f"train/{k}": row[k] for k in ("loss", "grad_norm", "lr")}
                               | ({"val/loss": row["val_loss"]} if row.get("val_loss") is not None else {}))
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            saved = ckpt_root and (done == end or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0))
            if saved:
                _save(ckpt_root, state, settings, data.position(done))
            if done < end and preemption.should_stop():  # SIGTERM: checkpoint this step, stop
                if ckpt_root and not saved:
                    _save(ckpt_root, state, settings, data.position(done))
                raise preemption.preempted(f"fine-tuning step {done} of {total}")
    finally:
        bar.close()
        if writer:
            writer.close()
    steps = int(jax.device_get(state["step"]))
    val_loss = next((r["val_loss"] for r in reversed(history) if r.get("val_loss") is not None), None)
    if steps == total and start == total:  # resumed a finished run: evaluate once more
        val_loss = validate()

    if lora is not None:
        adapters = state["trainable"]
        merged = merge_adapters(params, adapters, lora, mask)
    else:
        adapters = None
        dtypes, flat_sh = dict(spec.dtypes), flatten(p_sh)
        merged_flat = flatten(frozen)
        for n, x in flatten(state["trainable"]).items():
            merged_flat[n] = _cast(flat_sh[n], dtypes[n])(x)
        merged = unflatten({n: merged_flat[n] for n in flatten(params)})  # params order
    return FinetuneResult(
        params=merged, adapters=adapters, metrics=history, train_loss=last_loss, val_loss=val_loss,
        steps=steps, tokens=tokens, seconds=time.perf_counter() - start_time, resumed_from=resumed_from,
    )


# ---------------------------------------------------------------------------------- helpers

_STEP_CACHE: dict = {}


def _preflight(train_step, resident, data, step, batch_sh, mesh, knobs: str, memory_limit) -> None:
    """Compiles the train step for the longest bucket and fails (DeviceMemoryError) if it
    cannot fit, before the first step (so before any checkpoint is touched)."""
    from harmjax.memory import check_fits, preflight_wanted, program_bytes

    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if not preflight_wanted(devices, memory_limit):
        return
    example = data.step_batch(step)
    longest = max(data.buckets)
    batch = {k: jax.ShapeDtypeStruct(v.shape[:-1] + (longest,), v.dtype, sharding=batch_sh) for k, v in example.items()}
    needed = program_bytes(train_step.lower(*resident, batch).compile())
    check_fits(needed, f"The train step ({example['input_ids'].shape[0]} x {example['input_ids'].shape[1]} x "
               f"{longest} tokens)", resident, devices, knobs, memory_limit)


def _feed(batch: Mapping[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """A host batch on the mesh: every process computes the same global batch (the order is a
    function of the step) and hands over only its own rows."""
    return {k: distributed.process_local_batch(v, sharding) for k, v in batch.items()}


def _hashable(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


def _check_pruned_zero(params, mask) -> None:
    flat = flatten(params)
    for name, m in iter_leaves(mask):
        if bool(jax.device_get(_nonzero_where(flat[name], m))):
            raise ValueError(
                f"The params are not pruned with this mask: {name} has nonzero weights where the "
                "mask is True. Pass harmjax.apply_mask(params, mask) as the model's params."
            )


@jax.jit
def _nonzero_where(w, m):
    return jnp.any(jnp.where(m, w != 0, False))


_MASTERS: dict = {}


def _master(sharding):
    """jit: float32 master copy of a weight, zeroed where pruned."""
    if sharding not in _MASTERS:
        def f(w, m=None):
            w = w.astype(jnp.float32)
            return w if m is None else jnp.where(m, 0.0, w)
        _MASTERS[sharding] = jax.jit(f, out_shardings=sharding)
    return _MASTERS[sharding]


@functools.lru_cache(maxsize=None)
def _cast(sharding, dtype):
    """jit: a float32 master leaf back in the model dtype."""
    return jax.jit(lambda x: x.astype(dtype), out_shardings=sharding)


def _place_plans(plans, flat_sh, mesh):
    """Mask plans on the mesh: pruned positions replicated, dense masks like their weight."""
    out = {}
    for name, plan in plans.items():
        out[name] = {k: jax.device_put(v, flat_sh[name] if k == "dense_mask" else replicated(mesh))
                     for k, v in plan.items()}
    return out or None


def _mask_fingerprint(mask) -> str | None:
    if mask is None:
        return None
    h = hashlib.sha256()
    for name, m in iter_leaves(mask):
        h.update(name.encode())
        h.update(np.packbits(distributed.to_host(m).astype(bool)).tobytes())
    return h.hexdigest()


def _settings(cfg, lora, config, data, mask, total) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed (JSON-comparable)."""
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NON_RESULT_SETTINGS}
    return json.loads(json.dumps({
        "train": train,
        "lora": dataclasses.asdict(lora) if lora is not None else None,
        "model": hashlib.sha256(repr(config).encode()).hexdigest(),
        "data": data.fingerprint(),
        "mask": _mask_fingerprint(mask),
        "total_steps": total,
    }))


def _check_settings(path: str, settings: dict[str, Any]) -> None:
    saved = read_metadata(path).get("settings")
    if saved == settings:
        return
    diffs = []
    for group in sorted(set(settings) | set(saved or {})):
        a, b = (saved or {}).get(group), settings.get(group)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{group}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{group}: {a!r} -> {b!r}")
    raise FinetuneResumeError(
        f"{path} was written by a fine-tuning run with other settings or data ({'; '.join(diffs)}). "
        "Use another output_dir, or restore the original settings to resume."
    )


def _latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint (orbax finished and metadata written)."""
    if not os.path.isdir(root):
        return None
    found = sorted(d for d in os.listdir(root) if _CKPT.match(d))
    for d in reversed(found):
        path = os.path.join(root, d)
        if read_metadata(path).get("settings") is not None:
            return path
    return None


def _pack(state) -> dict[str, Any]:
    leaves = jax.tree.leaves(state["opt_state"])
    return {"step": state["step"], "key": state["key"], "trainable": state["trainable"],
            "opt": {f"{i:04d}": x for i, x in enumerate(leaves)}}


def _save(root: str, state, settings, position) -> None:
    step = int(jax.device_get(state["step"]))
    path = os.path.join(root, f"step_{step:08d}")
    save_tree(path, _pack(state), {"settings": settings, "step": step, "data_position": position})
    if distributed.is_writer():
        for d in sorted(d for d in os.listdir(root) if _CKPT.match(d))[:-2]:  # keep the latest two
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    distributed.barrier(f"pruned checkpoints {root}")


def _restore(path: str, state):
    """`state` (fresh, giving structure and shardings) with the checkpoint's values."""
    restored = restore_tree(path, _pack(state))
    treedef = jax.tree.structure(state["opt_state"])
    opt = jax.tree.unflatten(treedef, [restored["opt"][k] for k in sorted(restored["opt"])])
    return {"step": restored["step"], "key": restored["key"], "trainable": restored["trainable"], "opt_state": opt}


def _read_metrics(path: str, upto: int) -> list[dict[str, Any]]:
    """The logged rows up to step `upto` (read_jsonl drops a last line cut by a kill)."""
    if not os.path.isfile(path):
        return []
    return [row for row in read_jsonl(path) if row.get("step", 0) <= upto]


def _rewrite_metrics(path: str, rows) -> None:
    if not distributed.is_writer():
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _append_metrics(path: str, row) -> None:
    if not distributed.is_writer():
        return
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
