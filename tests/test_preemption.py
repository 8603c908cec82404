"""Preemption and lost processes (harmjax.preemption): a checkpointed scan run as a job
(tests/multihost_worker.py --scan) gets SIGTERM at a seeded random moment, alone and as one
of 2 CPU processes, or loses a process to kill -9; it must stop with one line and its
documented status, leave only whole files, and a rerun must end with scores bit-identical to
an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from harmjax import preemption
from tests.hf_reference import save_tiny_with_tokenizer, tiny_hf_model
from tests.test_multihost import WORKER, _env, _free_port

LOST_AFTER_S = 8  # the watchdog's bound in these tests (HARMJAX_LOST_PROCESS_TIMEOUT)
WAIT_S = 300  # a run that hangs fails the test instead of blocking CI


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("preemption")
    return root, save_tiny_with_tokenizer(tiny_hf_model("llama", seed=5, num_hidden_layers=2), root / "model")


def _start(model_dir, work, processes: int, address: str | None = None) -> list[subprocess.Popen]:
    os.makedirs(work, exist_ok=True)
    # One compilation cache for the module's runs (a rerun loads the same executables).
    cache = os.path.join(os.path.dirname(model_dir), "xla_cache")
    env = _env(4 // processes) | {"HARMJAX_LOST_PROCESS_TIMEOUT": str(LOST_AFTER_S), "JAX_COMPILATION_CACHE_DIR": cache,
                                  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    cmd = [sys.executable, WORKER, "--scan", str(model_dir), str(work)]
    if processes == 1:
        return [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    address = address or f"127.0.0.1:{_free_port()}"
    return [subprocess.Popen(cmd + [address, str(processes), str(i)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(processes)]


def _finish(procs, timeout=WAIT_S) -> list[tuple[int, str]]:
    """(exit status, stderr) of each process, killing all if one outlives `timeout`."""
    deadline = time.monotonic() + timeout
    out = []
    try:
        for i, p in enumerate(procs):
            try:
                _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"process {i} still running after {timeout} s")
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def _run(model_dir, work, processes: int):
    results = _finish(_start(model_dir, work, processes))
    assert all(rc == 0 for rc, _ in results), results
    return np.load(os.path.join(work, "scan.npz"))


def _wait_mid_scan(work, procs, rng) -> None:
    """Waits until the scan has saved its first state (so it is past loading and compiling),
    then a seeded random moment more."""
    state = os.path.join(work, "scan", "state")
    deadline = time.monotonic() + WAIT_S
    while not os.path.isdir(state):
        assert all(p.poll() is None for p in procs), _finish(procs)
        assert time.monotonic() < deadline, "the scan never saved a state"
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    # The job must still be running for the signal to land mid-scan (24 batches with a save
    # after each take several seconds).
    assert all(p.poll() is None for p in procs), "the scan finished before the signal"


@pytest.fixture(scope="module")
def reference(tiny):
    root, model_dir = tiny
    return _run(model_dir, root / "reference", 1)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _check_preempted(results, work):
    messages = set()
    for rc, err in results:
        assert rc == preemption.EXIT_PREEMPTED, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        (line,) = _error_lines(err)
        assert line.startswith("error: PreemptedError: stopped at the harm scan's batch "), line
        assert line.endswith("rerun the same command to continue."), line
        messages.add(line)
    assert len(messages) == 1, messages  # every process stopped at the same batch
    stopped_at = int(line.split("batch ")[1].split(" of ")[0])
    # Nothing half written: no results, no staging state, and the saved state is the stop point.
    scan_dir = work / "scan"
    assert not (work / "scan.npz").exists()
    assert sorted(os.listdir(scan_dir)) == ["state"], os.listdir(scan_dir)
    from harmjax.checkpoint import read_metadata

    assert read_metadata(str(scan_dir / "state"))["position"] == stopped_at
    return stopped_at


def _check_same(resumed, reference, stopped_at):
    assert int(resumed["resumed_from"]) == stopped_at  # continued there, not from the start
    names = [n for n in reference.files if n.startswith("harm/")]
    assert names and sorted(names) == sorted(n for n in resumed.files if n.startswith("harm/"))
    assert any(np.abs(reference[n]).max() > 0 for n in names)
    for n in names:
        np.testing.assert_array_equal(resumed[n], reference[n], err_msg=n)


def test_sigterm_alone_stops_at_a_batch_and_resumes_bit_identical(tiny, reference, tmp_path):
    _, model_dir = tiny
    procs = _start(model_dir, tmp_path, 1)
    _wait_mid_scan(tmp_path, procs, random.Random(27))
    procs[0].send_signal(signal.SIGTERM)
    stopped_at = _check_preempted(_finish(procs), tmp_path)
    _check_same(_run(model_dir, tmp_path, 1), reference, stopped_at)


def test_sigterm_to_two_processes_stops_both_at_one_batch(tiny, reference, tmp_path):
    _, model_dir = tiny
    rng = random.Random(2)
    procs = _start(model_dir, tmp_path, 2)
    _wait_mid_scan(tmp_path, procs, rng)
    # One of them (seeded: which one, or both) gets SIGTERM; both must stop at one batch.
    for i in rng.choice([[0], [1], [0, 1]]):
        procs[i].send_signal(signal.SIGTERM)
    stopped_at = _check_preempted(_finish(procs), tmp_path)
    _check_same(_run(model_dir, tmp_path, 2), reference, stopped_at)


def test_a_lost_process_ends_the_other_with_one_line_and_a_rerun_resumes(tiny, reference, tmp_path):
    _, model_dir = tiny
    procs = _start(model_dir, tmp_path, 2)
    _wait_mid_scan(tmp_path, procs, random.Random(9))
    procs[1].kill()  # SIGKILL: no clean-up of any kind
    killed = time.monotonic()
    # The bound: the watchdog's timeout, its polling, and start-up slack on a loaded machine.
    (rc, err), _ = _finish(procs, timeout=LOST_AFTER_S + 20)
    waited = time.monotonic() - killed
    assert rc == preemption.EXIT_LOST_PROCESS, err[-3000:]
    assert "Traceback" not in err and "Check failure" not in err, err[-3000:]
    (line,) = _error_lines(err)
    assert line.startswith("error: LostProcessError: process 1 of 2 was lost"), line
    assert "same command" in line, line
    assert waited >= LOST_AFTER_S - 1  # judged by the heartbeat, not by chance
    # The last saved state is whole; the rerun continues from it.
    assert not (tmp_path / "scan.npz").exists()
    from harmjax.checkpoint import read_metadata

    stopped_at = read_metadata(str(tmp_path / "scan" / "state"))["position"]
    assert 0 < stopped_at < 24
    _check_same(_run(model_dir, tmp_path, 2), reference, stopped_at)


def test_check_is_free_without_the_handler_and_stops_with_it():
    preemption.request_stop()  # no handler installed: the boundaries never stop
    preemption.check("a unit")
    with preemption.handle_sigterm():
        pass  # leaving the last handler clears the flag
    assert not preemption.stop_requested()
    with preemption.handle_sigterm():
        preemption.check("a unit")  # no SIGTERM yet
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets the flag
        assert preemption.stop_requested()
        with pytest.raises(preemption.PreemptedError, match=r"^stopped at a unit after SIGTERM; rerun"):
            preemption.check("a unit")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert not preemption.stop_requested()
