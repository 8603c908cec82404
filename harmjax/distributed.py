"""Running as one process of many: joining the JAX runtime, one writer, and barriers.

Every harmjax entry point can run as one process of a multi-process job (a TPU pod, several
GPU hosts, or several CPU processes on one machine). All processes run the same program on
the same inputs; arrays span every process's devices, each process reads and computes only
its own shards, and files are written once, by process 0 (orbax checkpoints are saved by all
processes together, each writing its shards). After a write, `barrier()` makes every process
wait until the file exists before anyone reads it (the file system must be shared).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from harmjax.errors import HarmjaxError

# Environment variables read when an argument is not given: harmjax's own, then JAX's names.
ENV_ADDRESS = ("HARMJAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
ENV_NUM_PROCESSES = ("HARMJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES")
ENV_PROCESS_ID = ("HARMJAX_PROCESS_ID", "JAX_PROCESS_ID")
DEFAULT_TIMEOUT_S = 300


class CoordinatorUnreachableError(HarmjaxError, ConnectionError):
    """A process could not reach the multi-process coordinator within the timeout."""


class DistributedConfigError(HarmjaxError, ValueError):
    """The multi-process settings are incomplete or inconsistent."""


def _env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def settings_from_env(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> tuple[str | None, int | None, int | None]:
    """The arguments, each filled from its environment variable when None
    (HARMJAX_COORDINATOR_ADDRESS / HARMJAX_NUM_PROCESSES / HARMJAX_PROCESS_ID, else JAX_...)."""
    address = coordinator_address or _env(ENV_ADDRESS)
    num = num_processes if num_processes is not None else _env(ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _env(ENV_PROCESS_ID)
    return address, None if num is None else int(num), None if pid is None else int(pid)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = DEFAULT_TIMEOUT_S,
    auto_detect: bool = False,
) -> bool:
    """Joins the multi-process JAX runtime; must run before anything else touches JAX devices.

    Args:
      coordinator_address: "host:port" of process 0's coordinator service.
      num_processes, process_id: this job's size and this process's rank (0 .. n-1).
        Missing values come from the environment (see `settings_from_env`).
      timeout_s: how long to wait for the coordinator and the other processes.
      auto_detect: with no address given, let JAX detect the cluster (TPU pods, SLURM,
        Open MPI, Kubernetes) instead of staying a single process.

    Returns:
      True when this process joined a multi-process runtime, False when it runs alone.

    Raises:
      CoordinatorUnreachableError: a process other than 0 cannot reach the coordinator within
        `timeout_s` (one line naming the address and the timeout, instead of a hang or a
        crash inside the runtime).
      DistributedConfigError: an address without a process count or rank, or several
        processes without an address.
    """
    address, num, pid = settings_from_env(coordinator_address, num_processes, process_id)
    if address is None and not auto_detect:
        if num is None or num == 1:
            return False  # a single process: nothing to join
        raise DistributedConfigError(
            f"{num} processes but no coordinator address: pass --coordinator_address=host:port "
            "(or HARMJAX_COORDINATOR_ADDRESS), or --distributed where JAX detects the cluster."
        )
    if address is not None:
        if num is None or pid is None:
            raise DistributedConfigError(
                f"coordinator address {address} given without the number of processes and this "
                "process's id: pass --num_processes and --process_id (or HARMJAX_NUM_PROCESSES and "
                "HARMJAX_PROCESS_ID)."
            )
        if not 0 <= pid < num:
            raise DistributedConfigError(f"process id {pid} is not in 0..{num - 1} for {num} processes.")
        if pid != 0:
            # JAX's client aborts the whole process (a C++ fatal error, no Python exception)
            # when it cannot register in time; reaching the port first turns that into a
            # clear error.
            _wait_for_port(address, timeout_s)
    # CPU devices talk through gloo (without it they have no cross-process collectives);
    # the setting only concerns CPU devices, so it is harmless on GPU and TPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption service catches SIGTERM in C++ and does nothing visible unless the
    # program polls its sync point, so a SIGTERM'd process kept running. harmjax handles
    # SIGTERM itself (`harmjax.preemption`: every process agrees on the stopping boundary).
    try:
        jax.config.update("jax_enable_preemption_service", False)
    except AttributeError:  # a JAX without the option has no service to turn off
        pass
    jax.distributed.initialize(
        coordinator_address=address, num_processes=num, process_id=pid, initialization_timeout=int(timeout_s),
    )
    return jax.process_count() > 1


def _wait_for_port(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedConfigError(f"coordinator address {address!r} is not of the form host:port.")
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise CoordinatorUnreachableError(
                f"cannot reach the coordinator at {address} within {timeout_s:g} s ({last}); start "
                "process 0 there first, or check the address and the firewall."
            )
        time.sleep(0.5)


def is_writer() -> bool:
    """True on the one process that writes files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches this point (a no-op in a single process).

    `name` must be the same string on every process and identify the point (e.g. the file
    just written), so that processes on different code paths fail rather than pass each other.
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def to_host(x: Any):
    """The full value of an array as NumPy, on every process (an all-gather when the array
    spans processes: every process must call it, in the same order)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def broadcast_json(value: Any) -> Any:
    """Process 0's value of a JSON-able object, on every process (itself when alone)."""
    if jax.process_count() == 1:
        return value
    blob = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_writer() else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(blob.size)))
    padded = np.zeros(size, np.uint8)
    padded[: min(size, blob.size)] = blob[:size]
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded))).decode())


def process_local_batch(host: Any, sharding) -> jax.Array:
    """A batch array with `sharding` built by `jax.make_array_from_process_local_data` from
    this process's rows of `host` (the global batch, which every process computes in the same
    order): each process hands over only the block of rows its own devices hold."""
    host = np.asarray(host)
    indices = sharding.addressable_devices_indices_map(host.shape).values()
    # The rows (and columns) this process's devices hold form one block; take its bounds.
    block = tuple(
        slice(min(ix[d].indices(n)[0] for ix in indices), max(ix[d].indices(n)[1] for ix in indices))
        for d, n in enumerate(host.shape)
    )
    return jax.make_array_from_process_local_data(sharding, host[block], host.shape)
