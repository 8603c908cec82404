"""`harmjax.score`: attribution scores of a model on (prompt, response) examples.

A scan tokenizes the examples (response-only loss mask), pads them into a few length buckets,
and runs one jitted forward/backward over all layers per micro-batch, accumulating float32
statistics in donated accumulators sharded like the weights. With `checkpoint_dir`, the
accumulators and the position in the data are saved with orbax every `checkpoint_every`
batches; a restarted scan continues from the last save and ends with scores identical to an
uninterrupted scan (same batches, same order, same float32 additions). After SIGTERM (with
`harmjax.preemption`'s handler installed) the scan saves its state at the batch boundary and
raises `PreemptedError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from harmjax import checkpoint, distributed, preemption
from harmjax.attribution.core import accumulator_mode, names_for, statistics_of
from harmjax.attribution.step import abstract_accumulators, init_accumulators, jit_accumulate, jit_finalize
from harmjax.data.calibration import Batch, calibration_batches
from harmjax.data.records import Example, to_examples
from harmjax.errors import HarmjaxError, ScoreKindError
from harmjax.sharding import batch_sharding, round_batch


class ResumeMismatchError(HarmjaxError, ValueError):
    """A scan checkpoint exists but was written by a different scan (model, data or settings)."""


@dataclasses.dataclass
class ScanResult:
    """Scores plus what the scan saw: examples, real tokens, mean response loss, wall time."""

    scores: dict[str, Any]  # for a tuple of kinds: {kind: scores}
    kind: str | tuple[str, ...]
    num_examples: int
    num_tokens: int
    mean_loss: float
    seconds: float
    resumed_from: int


def as_examples(examples: Any) -> list[Example]:
    """Accepts Examples, {"prompt", "response"} dicts, or a `datasets.Dataset` with those columns."""
    rows = list(examples)
    if rows and isinstance(rows[0], Example):
        return rows
    category_key = "category" if rows and isinstance(rows[0], dict) and "category" in rows[0] else None
    out, _ = to_examples(rows, "prompt", "response", category_key=category_key, source="examples")
    return out


def _fingerprint(model, kind: str, names: Sequence[str], batches: Sequence[Batch], settings: dict) -> str:
    """A digest of everything that determines the scores, so a resume cannot mix two scans."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": repr(model.config), "kind": kind, "names": list(names), **settings},
                        sort_keys=True).encode())
    for b in batches:
        h.update(b.input_ids.tobytes())
        h.update(b.loss_mask.tobytes())
    return h.hexdigest()


def _device_batch(array: np.ndarray, sharding) -> jax.Array:
    # Every process builds the whole (small) host batch in the same order and hands over only
    # its own devices' rows. Works on one host and on a multi-host pod alike.
    return distributed.process_local_batch(array, sharding)


def _save_state(directory: str, accs, position: int, loss_sum: float, tokens: int, fingerprint: str) -> None:
    # Write the new state beside the old one and swap, so a kill mid-save leaves a valid state.
    # Every process saves its shards; process 0 alone renames, and the others wait for it.
    target = os.path.join(directory, "state")
    staging = os.path.join(directory, f"state.{position}.tmp")
    if distributed.is_writer() and os.path.exists(staging):
        shutil.rmtree(staging)
    distributed.barrier(f"scan staging {staging}")
    checkpoint.save_tree(staging, accs, metadata={
        "position": position, "loss_sum": loss_sum, "tokens": tokens, "fingerprint": fingerprint,
    })
    if distributed.is_writer():
        _swap_state(directory, staging, target)
    distributed.barrier(f"scan state {target}")


def _swap_state(directory: str, staging: str, target: str) -> None:
    old = os.path.join(directory, "state.old")
    if os.path.exists(target):
        if os.path.exists(old):
            # A kill during the last save's clean-up left it, perhaps half deleted; `state`
            # is the valid one (`_load_state` reads it first).
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(staging, target)
    if os.path.exists(old):
        shutil.rmtree(old)


def _load_state(directory: str, template, fingerprint: str):
    for name in ("state", "state.old"):  # state.old survives a kill between the two renames
        path = os.path.join(directory, name)
        if os.path.isdir(path) and checkpoint.read_metadata(path):
            meta = checkpoint.read_metadata(path)
            if meta.get("fingerprint") != fingerprint:
                raise ResumeMismatchError(
                    f"{path} holds a scan of different model, data or settings. Use another "
                    "checkpoint_dir, or delete this one to start over."
                )
            return checkpoint.restore_tree(path, template), meta
    return None, None


def scan(
    model,
    examples: Any,
    kind: str | Sequence[str] = "harm",
    *,
    scope: Sequence[str] | None = None,
    batch_size: int = 8,
    text_format: str = "raw",
    max_length: int = 256,
    num_buckets: int = 4,
    remat: bool = False,
    abs_chunk: int = 8,
    params: dict[str, Any] | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
    stop_after: int | None = None,
    memory_limit: int | None = None,
    layerwise: bool = False,
) -> ScanResult:
    """Runs an attribution scan and returns its scores and statistics.

    Args:
      model: a `harmjax.Model` (params, config, tokenizer, mesh).
      examples: `Example`s, {"prompt", "response"} dicts or a `datasets.Dataset`.
      kind: "harm", "retain", "retain_mean", "wanda" or "magnitude" (see
        `harmjax.attribution.core`), or a tuple of them, computed from one pass (scores then
        map each kind to its tree). "magnitude" alone reads no data: no pass runs, and the
        result has num_tokens 0 and mean_loss NaN.
      scope: fnmatch patterns of HF names to score (default: the 7 projections of every block).
      batch_size: micro-batch rows (rounded up to a multiple of the mesh's data x fsdp size).
      text_format: "raw" (prompt + "\\n" + response, the reference) or "chat".
      max_length: tokens per example after truncation (the response is kept).
      num_buckets: padded lengths (each compiles once): halvings of the longest bucket.
      remat: recompute each block in the backward pass (less memory, ~1/3 more compute).
      abs_chunk: examples per block of per-example gradients ("retain" only).
      params: score these params instead of `model.params` (e.g. a pruned model).
      checkpoint_dir: where to save/resume the scan state; None disables checkpointing.
      checkpoint_every: batches between saves.
      progress: show a tqdm bar.
      stop_after: process at most this many batches in this call, then save and return
        partial scores (for time-sliced jobs; the final state is still resumable).
      memory_limit: bytes per device to check the step against before the first batch (see
        `harmjax.memory`; default: $HARMJAX_DEVICE_MEMORY_LIMIT, else the device's own limit,
        no check on CPU). A step that cannot fit raises DeviceMemoryError before any work.
      layerwise: run each step as one small program per decoder block
        (`harmjax.attribution.layerwise`): compiles one block instead of the whole unrolled
        pass, much faster for deep models; same scores up to the rounding of a different
        program.
    """
    kind = kind if isinstance(kind, str) else tuple(kind)
    mode = accumulator_mode(kind)  # also validates kind
    if "act" in statistics_of(mode) and getattr(model.config, "num_experts", 0):
        # Expert matrices run as grouped matmuls whose probes take no input sums yet.
        raise ScoreKindError(f"wanda does not score mixture-of-experts models yet ({model.config.model_type}); "
                             "use the gradient kinds or magnitude.")
    examples = as_examples(examples)
    if not examples:
        raise ValueError("No examples to score.")
    names = names_for(model.config, scope)
    rows = round_batch(batch_size, model.mesh)
    batches = calibration_batches(model.tokenizer, examples, rows, text_format, max_length, num_buckets)
    settings = {"text_format": text_format, "max_length": max_length, "rows": rows, "buckets": num_buckets}
    fingerprint = _fingerprint(model, kind, names, batches, settings)
    params = model.params if params is None else params
    if mode == "none":  # magnitude only: the weights alone
        return _weights_only(model, params, names, kind, len(examples))

    step = jit_accumulate(model.config, model.mesh, names, kind, remat, abs_chunk, layerwise=layerwise)
    sharding = batch_sharding(model.mesh)
    _preflight(model, step, params, names, mode, batches, sharding, kind,
               f"batch_size={batch_size}, remat={remat}, mesh={dict(model.mesh.shape)}", memory_limit)

    accs, start, loss_sum, tokens = None, 0, 0.0, 0
    if checkpoint_dir:
        os.makedirs(checkpoint_dir, exist_ok=True)
        template = abstract_accumulators(model.config, model.mesh, names, mode)
        accs, meta = _load_state(checkpoint_dir, template, fingerprint)
        if accs is not None:
            start, loss_sum, tokens = meta["position"], meta["loss_sum"], meta["tokens"]
            logging.info("Resuming %s scan at batch %d of %d.", kind, start, len(batches))
    if accs is None:
        accs = init_accumulators(model.config, model.mesh, names, mode)

    end = len(batches) if stop_after is None else min(len(batches), start + stop_after)
    t0 = time.perf_counter()
    bar = tqdm(total=len(batches), initial=start, desc=f"{_label(kind)} scan", unit="batch", disable=not progress)
    for position in range(start, end):
        b = batches[position]
        accs, loss = step(params, accs, *(_device_batch(a, sharding) for a in (b.input_ids, b.attention_mask, b.loss_mask)))
        loss_sum += float(loss)
        tokens += b.num_tokens
        bar.update(1)
        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
        done = position + 1
        # No save after the last batch: the scores are returned (and saved by the caller)
        # right away, and an 8B accumulator tree is 28 GiB of writing for nothing.
        saved = checkpoint_dir and done < len(batches) and (done % checkpoint_every == 0 or done == end)
        if saved:
            _save_state(checkpoint_dir, accs, done, loss_sum, tokens, fingerprint)
        if done < end and preemption.should_stop():  # SIGTERM: save here (atomic), then stop
            if checkpoint_dir and not saved:
                _save_state(checkpoint_dir, accs, done, loss_sum, tokens, fingerprint)
            bar.close()
            raise preemption.preempted(f"the {_label(kind)} scan's batch {done} of {len(batches)}")
    bar.close()
    resumed_from = start
    if end < len(batches):
        logging.info("Stopped after batch %d of %d; rerun to continue.", end, len(batches))
    finalize = jit_finalize(model.config, model.mesh, names, kind)
    if checkpoint_dir and end == len(batches):
        # Keep the final accumulators: finalize donates them.
        accs = jax.tree.map(jnp.copy, accs)
    scores = finalize(params, accs)
    jax.block_until_ready(scores)
    return ScanResult(
        scores=scores, kind=kind, num_examples=len(examples), num_tokens=tokens,
        mean_loss=loss_sum / len(examples), seconds=time.perf_counter() - t0, resumed_from=resumed_from,
    )


def _weights_only(model, params, names, kind, num_examples: int) -> ScanResult:
    """The result of a scan whose kinds need no data (magnitude): no batch runs."""
    t0 = time.perf_counter()
    scores = jit_finalize(model.config, model.mesh, names, kind)(params, {})
    jax.block_until_ready(scores)
    return ScanResult(scores=scores, kind=kind, num_examples=num_examples, num_tokens=0, mean_loss=float("nan"),
                      seconds=time.perf_counter() - t0, resumed_from=0)


def _preflight(model, step, params, names, mode, batches, sharding, kind, knobs: str, memory_limit) -> None:
    """Compiles the step for the longest batch and fails (DeviceMemoryError) if it cannot fit."""
    from harmjax.memory import check_fits, preflight_wanted

    devices = [d for d in model.mesh.devices.flat if d.process_index == jax.process_index()]
    if not preflight_wanted(devices, memory_limit):
        return
    longest = max(batches, key=lambda b: b.input_ids.shape[1])
    key = (step, longest.input_ids.shape)
    if key not in _NEEDED:  # one compilation per step and shape (the experiment scans 7+ times)
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
                 for a in (longest.input_ids, longest.attention_mask, longest.loss_mask)]
        accs = abstract_accumulators(model.config, model.mesh, names, mode)
        _NEEDED[key] = step.needed_bytes(params, accs, *specs)
    check_fits(_NEEDED[key], f"The {_label(kind)} scan step ({longest.input_ids.shape[0]} x {longest.input_ids.shape[1]} "
               "tokens)", params, devices, knobs, memory_limit)


_NEEDED: dict = {}  # (step, batch shape) -> bytes per device (AccumulateStep.needed_bytes)


def _label(kind) -> str:
    return "+".join([kind] if isinstance(kind, str) else kind)


def score(model, examples: Any, kind: str = "harm", **kwargs) -> dict[str, Any]:
    """Attribution scores: a float32 pytree with the params' structure over the scored leaves.

    `kind` is "harm" (-W * sum_i dL_i/dW, signed SNIP), "retain" (|W| * sum_i |dL_i/dW|),
    "retain_mean" (|W * sum_i dL_i/dW|), "wanda" (|W| * sqrt(sum_t x_t^2), the L2 norm of each
    input feature over every non-padding token) or "magnitude" (|W|); L_i is example i's mean
    response-token NLL. Keyword
    arguments are those of `scan` (scope, batch_size, text_format, max_length, remat,
    checkpoint_dir, ...).
    """
    return scan(model, examples, kind, **kwargs).scores
