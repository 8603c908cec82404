"""Helpers shared by the absl entry points: the model argument, the mesh, the `--config`
flag and multi-process start-up (`--coordinator_address`, `--num_processes`, `--process_id`,
or `--distributed` for JAX's cluster auto-detection)."""

from __future__ import annotations

import os
import sys

from absl import app, flags

from harmjax.sharding import MeshConfig

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Join a multi-process job whose coordinator JAX detects itself (TPU pods, SLURM, Open MPI, "
    "Kubernetes): run the same command on every host.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0's coordinator, for a multi-process job (env HARMJAX_COORDINATOR_ADDRESS "
    "or JAX_COORDINATOR_ADDRESS). Needs --num_processes and --process_id.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the job (env HARMJAX_NUM_PROCESSES or JAX_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's rank, 0 .. num_processes-1 (env HARMJAX_PROCESS_ID or JAX_PROCESS_ID)."
)
_COORDINATOR_TIMEOUT = flags.DEFINE_integer(
    "coordinator_timeout", 300,
    "Seconds to wait for the coordinator and the other processes before failing.",
)


# The share of each accelerator's memory JAX preallocates when the user has not set
# XLA_PYTHON_CLIENT_MEM_FRACTION. JAX's own default, 0.75, leaves 35 GB of an H200 unused; a
# 32B scan needs ~124 GiB per H200. 0.9 leaves ~10% for cuBLAS/cuDNN workspaces and NCCL
# buffers, which live outside JAX's pool.
DEFAULT_MEM_FRACTION = "0.9"


def init_runtime() -> None:
    """Start-up shared by every entry point: sets XLA_PYTHON_CLIENT_MEM_FRACTION to
    DEFAULT_MEM_FRACTION unless it is already set (before JAX starts its backend), joins the
    multi-process runtime when asked (it must precede any use of JAX devices), keeps library
    INFO chatter (orbax logs every save) off the console unless `-v`/`--verbosity` is given
    (progress bars and summaries still show), turns on JAX's persistent compilation cache
    (`HARMJAX_XLA_CACHE`, default ~/.cache/harmjax/xla; "off" disables it), and in a
    multi-process job starts the lost-process watchdog (`harmjax.preemption`)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION)
    from absl import logging

    from harmjax import distributed

    distributed.initialize(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        timeout_s=_COORDINATOR_TIMEOUT.value, auto_detect=_DISTRIBUTED.value,
    )
    # A process of the job that dies makes the others exit with one line within
    # $HARMJAX_LOST_PROCESS_TIMEOUT s (default 30) instead of hanging in a collective.
    from harmjax import preemption

    preemption.watch_processes()
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    cache = os.environ.get("HARMJAX_XLA_CACHE", "~/.cache/harmjax/xla")
    if cache != "off":
        # Compiled programs persist, so the next run (or a rerun after a kill) skips compiling.
        import jax

        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def config_main(run, config, report=None):
    """The absl `main` of a launcher whose whole job is `run(cfg)` on its --config: start-up
    (`init_runtime`), the job, then `report(result)` (default: log "Done.")."""

    def main(argv):
        del argv
        cfg = checked_config(config)  # before start-up: a slip costs no JAX start
        init_runtime()
        result = run(cfg)
        if report is None:
            from absl import logging

            logging.info("Done.")
        else:
            report(result)

    return main


def run_app(main) -> None:
    """`absl.app.run(main)`, with harmjax's input errors (missing file, bad dataset, disk too
    small, ...) printed as one `error:` line and exit status 1 instead of a traceback: the
    message already names the problem and the fix, and finished stages stay on disk.

    SIGTERM (preemption) stops the job at the next unit boundary: one `error: PreemptedError`
    line and exit status 143 (`harmjax.preemption.EXIT_PREEMPTED`); rerunning the command
    continues from the last finished unit."""
    from harmjax.errors import HarmjaxError

    def guarded(argv):
        from harmjax import preemption

        try:
            with preemption.handle_sigterm(), preemption.clean_exit():
                return main(argv)
        except HarmjaxError as e:
            sys.exit(f"error: {type(e).__name__}: {e}")

    app.run(guarded)


def resolve_model_source(model: str) -> str:
    """'embedded' becomes the converted SmolLM2 directory (fetched on first use); anything
    else (directory, .gguf file, hub id) is passed through."""
    from harmjax import assets

    return assets.resolve_model_source(model)


def mesh_config(mesh) -> MeshConfig:
    """A MeshConfig from a config dict with data/fsdp/tensor entries."""
    return MeshConfig(data=int(mesh.data), fsdp=int(mesh.fsdp), tensor=int(mesh.tensor))


_CONFIG_HOLDER = None


def config_flag(default: str, help_text: str = "Job config file (ml_collections)."):
    """Defines `--config` (an ml_collections config file) once per process.

    Each entry point defines its own `--config` default; importing two entry points into one
    process (tests, notebooks calling their `run(cfg)` functions) would otherwise raise
    absl's DuplicateFlagError. The first definition wins; `run(cfg)` functions take the
    config explicitly, so the default of a second module is never needed.
    """
    global _CONFIG_HOLDER
    if _CONFIG_HOLDER is None:
        from ml_collections import config_flags

        from launch import slips

        try:
            _CONFIG_HOLDER = config_flags.DEFINE_config_file("config", default, help_text)
        except Exception as e:  # noqa: BLE001 - one line, not a traceback
            # Without --config on the command line, ml_collections parses the default file
            # and the --config.x overrides right here, at definition.
            slips.fail(slips.explain_parse_error(default, e, sys.argv))
        # A typo in a setting, a wrong value or a missing config file: one `error:` line
        # while absl parses the command line, before any model is loaded.
        slips.guard_config_flag(flags.FLAGS, "config")
    return _CONFIG_HOLDER


def checked_config(holder):
    """The parsed config of `holder` (from `config_flag`), after checking that every
    non-empty `output_dir` setting can be created and written (one `error:` line if not)."""
    from launch import slips

    cfg = holder.value
    slips.check_output_dirs(cfg)
    return cfg
