"""Stopping cleanly: SIGTERM (preemption) at unit boundaries, and a lost process of a job.

SIGTERM is what TPU and cloud schedulers send before they take a machine back. With the
handler installed (`handle_sigterm()`, which `launch.common.run_app` uses for every
launcher), a SIGTERM only sets a flag; the long loops (scan batches, fine-tuning steps,
answer chunks, stage units) call `check(unit)` at each boundary, finish or drop the unit in
progress (each unit is written atomically, so nothing half is left), and raise
`PreemptedError`. Launchers print it as one `error:` line and exit with `EXIT_PREEMPTED`
(143, the status of a process ended by SIGTERM); a rerun of the same command continues from
the last finished unit. In a multi-process job, `check` is collective: every process
gathers every process's flag, so SIGTERM to any one of them stops all of them at the same
boundary (and collective saves there stay collective).

A process of a multi-process job that dies (kill -9, a lost host) leaves the others waiting
in a collective until JAX's own heartbeat check aborts them with a C++ trace (100 s by
default). `watch_processes()` starts a watchdog: each process posts a heartbeat to the
coordinator's key-value store every second; when a peer's heartbeat has not changed for
`lost_after_s` seconds (default `LOST_AFTER_S`, below JAX's 100 s), the watchdog prints one
line naming the lost process and how to resume, and ends this process with
`EXIT_LOST_PROCESS` (75, EX_TEMPFAIL). See "Preemption and lost processes" in
docs/design_runs.md for what it cannot catch (the death of process 0, which hosts the
coordinator).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import jax
import numpy as np

from harmjax.errors import HarmjaxError

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what a scheduler sees from a job SIGTERM ended
EXIT_LOST_PROCESS = 75  # EX_TEMPFAIL: a temporary failure, rerun to continue
LOST_AFTER_S = 30.0  # seconds without a peer's heartbeat before it counts as lost
HEARTBEAT_S = 1.0
RESUME_HINT = "rerun the same command to continue"


class PreemptedError(HarmjaxError, RuntimeError):
    """The job stopped at a unit boundary after SIGTERM; finished units are on disk."""


class _Stop:
    """The process-wide state: whether SIGTERM came, and whether the handler is installed."""

    requested = False
    armed = 0  # nesting depth of handle_sigterm(); 0: `check` costs nothing and never stops
    last_stopped: list[int] = []  # the processes SIGTERM reached, as of the last boundary


def request_stop() -> None:
    """What the SIGTERM handler does: ask the long loops to stop at their next boundary."""
    _Stop.requested = True


def stop_requested() -> bool:
    """Whether this process has been asked to stop (its own flag, no communication)."""
    return _Stop.requested


def _on_sigterm(signum, frame) -> None:
    del signum, frame
    request_stop()


@contextlib.contextmanager
def handle_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM asks the long loops to stop at their next unit boundary
    (`PreemptedError`) instead of killing the process. The previous handler comes back on
    exit. Must be entered in the main thread (Python's rule for signal handlers), by every
    process of a multi-process job (`check` is then collective)."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _Stop.armed += 1
    try:
        yield
    finally:
        _Stop.armed -= 1
        signal.signal(signal.SIGTERM, previous)
        if not _Stop.armed:
            _Stop.requested = False


def _stopped_processes() -> list[int]:
    """The processes whose flag is set; in a multi-process job, every process's flag
    gathered (a collective: every process calls it at the same boundary)."""
    if jax.process_count() == 1:
        return [0] if _Stop.requested else []
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.int32(_Stop.requested)))
    return [int(p) for p in np.flatnonzero(flags.reshape(-1))]


def should_stop() -> bool:
    """True when the job must stop at this boundary (SIGTERM to this or, in a multi-process
    job, any process). Cheap: a flag read alone, one tiny all-gather across processes; always
    False where no handler is installed. Call `check` (or this, then raise `preempted`) at
    the same boundaries on every process."""
    if not _Stop.armed:
        return False
    stopped = _stopped_processes()
    _Stop.last_stopped = stopped
    return bool(stopped)


def preempted(unit: str) -> PreemptedError:
    """The error for a stop at `unit` (call after `should_stop()` returned True)."""
    who = _Stop.last_stopped
    where = "" if jax.process_count() == 1 else f" to process {', '.join(map(str, who))}"
    return PreemptedError(f"stopped at {unit} after SIGTERM{where}; {RESUME_HINT}.")


def check(unit: str) -> None:
    """A unit boundary: raises `PreemptedError` naming `unit` when the job must stop."""
    if should_stop():
        raise preempted(unit)


# ------------------------------------------------------------------------- lost processes


class _Watch:
    thread: threading.Thread | None = None
    stop = threading.Event()
    lost_after_s = LOST_AFTER_S


def _client():
    # JAX keeps its distributed client in a private module; it has no public accessor.
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def watch_processes(lost_after_s: float | None = None) -> bool:
    """Starts the lost-process watchdog (once; a no-op in a single process). Call it after
    `harmjax.distributed.initialize`, on every process. Returns whether it runs.

    `lost_after_s` (default $HARMJAX_LOST_PROCESS_TIMEOUT, else `LOST_AFTER_S`) is how long
    a peer's heartbeat may stay unchanged; this process then exits within about that time
    plus `HEARTBEAT_S`. Keep it below JAX's heartbeat timeout (100 s), which aborts instead.
    """
    if jax.process_count() == 1 or _client() is None:
        return False
    if _Watch.thread is not None:
        return True
    if lost_after_s is None:
        lost_after_s = float(os.environ.get("HARMJAX_LOST_PROCESS_TIMEOUT", LOST_AFTER_S))
    _Watch.lost_after_s = lost_after_s
    _Watch.stop.clear()
    _Watch.thread = threading.Thread(target=_watch, args=(_client(), jax.process_index(), jax.process_count(),
                                                          lost_after_s), name="harmjax-watchdog", daemon=True)
    _Watch.thread.start()
    return True


def watching() -> bool:
    """Whether the lost-process watchdog runs in this process."""
    return _Watch.thread is not None


def stop_watching() -> None:
    """Stops the watchdog and tells the peers this process ended on purpose (so a peer still
    finishing its last writes does not count it as lost)."""
    if _Watch.thread is None:
        return
    _Watch.stop.set()
    _Watch.thread.join(timeout=5)
    with contextlib.suppress(Exception):
        _client().key_value_set(_key(jax.process_index()), "exited", allow_overwrite=True)
    _Watch.thread = None


def await_lost_verdict() -> None:
    """After an error in a multi-process job (a collective failing because a peer died),
    waits until the watchdog could have judged the peers: if one is lost, the watchdog ends
    the process with its one line; otherwise this returns and the error stands."""
    if _Watch.thread is not None:
        _Watch.stop.wait(_Watch.lost_after_s + 2 * HEARTBEAT_S)


def _key(process: int) -> str:
    return f"harmjax/heartbeat/{process}"


def _watch(client, me: int, count: int, lost_after_s: float) -> None:
    """The watchdog's loop: post this process's heartbeat, read the peers', judge.

    The store's calls run in a helper thread, so a call that hangs (the coordinator gone)
    cannot stop the judging: it then counts as the coordinator (process 0) lost.
    """
    peers = [p for p in range(count) if p != me]
    start = time.monotonic()
    seen = {p: (None, start) for p in peers}  # last value, when it last changed
    answered = [start]  # when the store last answered

    def beat():
        n = 0
        while not _Watch.stop.is_set():
            n += 1
            try:
                client.key_value_set(_key(me), str(n), allow_overwrite=True)
                now = time.monotonic()
                for p in peers:
                    try:
                        value = client.key_value_try_get(_key(p))
                    except Exception:  # noqa: BLE001 - not posted yet
                        value = None
                    if value != seen[p][0]:
                        seen[p] = (value, now)
                answered[0] = now
            except Exception:  # noqa: BLE001 - the store is unreachable: judged below
                pass
            _Watch.stop.wait(HEARTBEAT_S)

    threading.Thread(target=beat, name="harmjax-heartbeat", daemon=True).start()
    while not _Watch.stop.wait(HEARTBEAT_S / 2):
        now = time.monotonic()
        if now - answered[0] > lost_after_s:
            _lost(0, count, lost_after_s, "its coordinator stopped answering")
        for p, (value, changed) in seen.items():
            if value != "exited" and now - changed > lost_after_s:
                _lost(p, count, lost_after_s, "no heartbeat")


def _lost(process: int, count: int, lost_after_s: float, why: str) -> None:
    print(f"error: LostProcessError: process {process} of {count} was lost ({why} for {lost_after_s:g} s); "
          f"process {jax.process_index()} stops too. Start every process again with the same command to "
          "continue from the last finished unit.", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # The main thread may be blocked in a collective that will never finish: end here,
    # without the runtime's shutdown (it would wait for the lost process).
    os._exit(EXIT_LOST_PROCESS)


@contextlib.contextmanager
def clean_exit() -> Iterator[None]:
    """The guard of a job's main: a `PreemptedError` becomes one `error:` line and exit
    status `EXIT_PREEMPTED`; any other error in a multi-process job first waits for the
    watchdog's verdict (a collective that failed because a peer died ends as the
    watchdog's one line). Other `HarmjaxError`s are left to the caller."""
    try:
        yield
    except PreemptedError as e:
        stop_watching()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            # Every process stopped at this boundary: leave the runtime together. Process 0
            # hosts the coordinator; had it exited alone, JAX would abort the others.
            jax.distributed.shutdown()
        sys.exit(EXIT_PREEMPTED)
    except HarmjaxError:
        raise
    except Exception:
        await_lost_verdict()
        raise
    else:
        stop_watching()
