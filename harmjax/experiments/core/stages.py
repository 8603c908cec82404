"""Cached, resumable stages, shared by every experiment.

A stage's outputs live in `<run>/cache/<stage>-<key>/`, where `key` digests the stage's
settings and the keys of the stages it reads. A stage is finished when its `DONE.json` exists
(written last, atomically), so a killed run redoes only unfinished stages, and a changed
setting redoes exactly the stages that depend on it. Inside a stage, work is split into
units (a chunk of generations, a scan checkpoint, one mask, one evaluation) that are each
written atomically, so a kill mid-stage loses at most the unit in progress. After SIGTERM
(`harmjax.preemption`), a run stops at the next unit boundary with `PreemptedError`.

In a multi-process job every process runs every stage (the arrays span all of them); process
0 alone writes and renames files, and the others wait at a barrier until it has, so all of
them read the same files next.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
from absl import logging

from harmjax import distributed, memory, preemption

DONE = "DONE.json"


def settings_key(settings: Mapping[str, Any]) -> str:
    """A short digest of JSON-able settings (the stage-directory suffix)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def examples_digest(examples: Iterable[Any], fields: Sequence[str] = ("id", "category", "prompt")) -> str:
    """A short digest of examples' `fields` (in order), for stage settings: the same examples in
    the same order give the same key, so a run directory made before stays served from cache."""
    h = hashlib.sha256()
    for e in examples:
        h.update(("\x00".join(str(getattr(e, f)) for f in fields) + "\x01").encode())
    return h.hexdigest()[:16]


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes JSON through a temporary file and a rename, so readers never see half a file.
    Every process calls it; process 0 writes and the others wait until the file exists."""
    if distributed.is_writer():
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=_jsonable)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    distributed.barrier(f"wrote {path}")


def read_json(path: str) -> Any:
    """Reads a JSON file written by `write_json_atomic`."""
    with open(path) as f:
        return json.load(f)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def as_config(cfg):
    """An ml_collections ConfigDict from a ConfigDict or a nested dict of the same fields."""
    import ml_collections

    return cfg if isinstance(cfg, ml_collections.ConfigDict) else ml_collections.ConfigDict(cfg)


def slug(text: str) -> str:
    """A file-name-safe, lower-case form of a label (e.g. a harm category)."""
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_") or "none"


def default_run_dir(model_source: str, job: str = "experiment") -> str:
    """runs/<job>-<model name>: where a job writes when the config gives no output_dir."""
    name = os.path.basename(os.path.normpath(model_source)) or "model"
    return os.path.join("runs", f"{job}-{name}")


class StageCache:
    """The stage directories of one run (see the module docstring)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.root = os.path.join(run_dir, "cache")
        os.makedirs(self.root, exist_ok=True)
        self.timings: dict[str, dict[str, Any]] = {}

    def path(self, name: str, settings: Mapping[str, Any]) -> str:
        """The directory of stage `name` under these settings."""
        return os.path.join(self.root, f"{name}-{settings_key(settings)}")

    def run(self, name: str, settings: Mapping[str, Any], compute: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        """Returns stage `name`'s info dict, computing it (in its directory) unless finished.

        `compute(directory)` does the work, resuming from whatever units it finds there,
        and returns a JSON-able info dict, stored in DONE.json with the settings.
        """
        directory = self.path(name, settings)
        done = os.path.join(directory, DONE)
        if os.path.isfile(done):
            record = read_json(done)
            # "seconds" is this run's time (0); what the stage took when it ran is kept beside it.
            self.timings[name] = {"seconds": 0.0, "cached": True, "dir": directory,
                                  **{f"computed_{k}": record[k] for k in ("seconds", "peak_device_gib") if k in record}}
            logging.info("Stage %s: cached (%s).", name, directory)
            return record["info"]
        preemption.check(f"stage {name}")  # SIGTERM: stop before starting a stage
        os.makedirs(directory, exist_ok=True)
        t0 = time.perf_counter()
        info = compute(directory)
        seconds = time.perf_counter() - t0
        # The devices' peak memory so far in this process (a running maximum: a stage's own
        # peak is its value where it exceeds the stages before it).
        peak = memory.peak_bytes(jax.local_devices())
        extra = {} if peak is None else {"peak_device_gib": round(peak / 2**30, 2)}
        write_json_atomic(done, {"stage": name, "settings": settings, "info": info, "seconds": seconds, **extra})
        self.timings[name] = {"seconds": seconds, "cached": False, "dir": directory, **extra}
        return info


@dataclasses.dataclass
class ExperimentRun:
    """One run of an experiment: its config, model and stage cache. Each experiment's run
    context extends it with what its stages leave for the ones after them."""

    cfg: Any
    source: str
    model: Any
    model_id: dict[str, Any]
    stages: StageCache
    progress: bool
    load_seconds: float = 0.0

    @property
    def dir(self) -> str:
        """The run directory."""
        return self.stages.run_dir


def unit_done(path: str) -> bool:
    """Whether a unit directory written by `finish_unit` is complete."""
    return os.path.isfile(os.path.join(path, DONE))


def finish_unit(tmp_path: str, path: str, info: Mapping[str, Any] | None = None) -> None:
    """Marks the unit built in `tmp_path` complete and moves it to `path` (replacing a stale one)."""
    write_json_atomic(os.path.join(tmp_path, DONE), dict(info or {}))
    if distributed.is_writer():
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp_path, path)
    distributed.barrier(f"finished {path}")


def fresh_dir(path: str) -> str:
    """An empty `<path>.partial` directory to build a unit in (a leftover from a kill is cleared).
    A unit boundary: after SIGTERM, raises `PreemptedError` instead of starting the unit."""
    preemption.check(f"unit {os.path.basename(path)}")
    tmp = f"{path}.partial"
    if distributed.is_writer():
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    distributed.barrier(f"fresh {tmp}")
    return tmp
