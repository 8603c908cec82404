"""Multi-process runs: 2 processes x 2 CPU devices on one mesh give the results of 1 process
with 4 devices (load, harm and retain scans, select, mask save and reload, apply_mask, greedy
generation, two LoRA steps, the experiment's stages) while each process reads only its own
checkpoint slices; a launcher joins through flags or environment variables; a process that
cannot reach the coordinator fails fast with one line."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.config_overrides import write_prompt_files
from tests.hf_reference import VOCAB, save_tiny_with_tokenizer, tiny_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multihost_worker.py")
TIMEOUT_S = 900  # a hung collective fails the test instead of blocking CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    # Each process sees only its own fake CPU devices; the test session's settings stay out.
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HARMJAX_XLA_CACHE"] = "off"  # no compilation cache written outside the test's dirs
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


def _run(procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    outputs = []
    try:
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"process {len(outputs)} of {len(procs)} still running after {TIMEOUT_S} s "
                            "(a hung collective or coordinator?); all were killed")
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # Every failed process's output: one that dies first makes the others fail in a collective
    # ("connection closed by peer"), and the first failure is the one worth reading.
    failed = [f"process {i} failed (rc {p.returncode}):\n{out[-4000:]}"
              for i, (p, out) in enumerate(zip(procs, outputs)) if p.returncode != 0]
    assert not failed, "\n\n".join(failed)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    # Seed 5's greedy answers are non-empty text, so the experiment has examples to score.
    model_dir = save_tiny_with_tokenizer(tiny_hf_model("llama", seed=5, num_hidden_layers=2), root / "model")
    write_prompt_files(root, {c: 3 for c in ("crime", "hate")}, {"facts": 3, "code": 3})
    return root, model_dir


def _both_runs(tiny):
    """Runs the worker as 1 process x 4 devices, then as 2 processes x 2 devices; returns
    their work directories."""
    root, model_dir = tiny
    single, multi = root / "single", root / "multi"
    single.mkdir()
    multi.mkdir()
    common = [sys.executable, WORKER, model_dir, str(root)]
    t0 = time.perf_counter()
    _run([subprocess.Popen(common + [str(single)], env=_env(4), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)])
    t1 = time.perf_counter()
    address = f"127.0.0.1:{_free_port()}"
    _run([subprocess.Popen(common + [str(multi), address, "2", str(i)], env=_env(2), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for i in range(2)])
    print(f"1 process: {t1 - t0:.0f} s, 2 processes: {time.perf_counter() - t1:.0f} s")
    return single, multi


def _reads(directory, process):
    with open(directory / f"reads_{process}.json") as f:
        return json.load(f)


def test_two_processes_match_one_and_read_only_their_shards(tiny):
    # One test for both checks: under pytest-xdist a shared fixture would run once per worker.
    single_dir, multi_dir = _both_runs(tiny)
    _check_results_equal(*(np.load(d / "results.npz") for d in (single_dir, multi_dir)))
    _check_each_process_reads_only_its_shards(single_dir, multi_dir)


def _check_results_equal(single, multi):
    assert sorted(single.files) == sorted(multi.files)
    # Sanity of the reference itself: the work did something.
    assert int(single["mask_summary_pruned"]) > 0
    assert single["generated"].shape == (3, 5)
    for name in single.files:
        a, b = single[name], multi[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # Same mesh, same programs, same shardings: the only difference is which process
        # owns a device, so every result is bit for bit equal.
        np.testing.assert_array_equal(a, b, err_msg=name)
    for name in (n for n in single.files if n.startswith("harm_layerwise/")):  # another program: rounding only
        ref = single["harm/" + name.split("/", 1)[1]]
        np.testing.assert_allclose(single[name], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=name)
    for name in (n for n in single.files if n.startswith("mask_reloaded/")):
        np.testing.assert_array_equal(single[name], single["mask/" + name.split("/", 1)[1]])
    for name in (n for n in single.files if n.startswith(("orbax_reloaded/", "pruned_hf_reloaded/"))):
        kind, leaf = name.split("/", 1)
        np.testing.assert_array_equal(single[name], single[("params/" if kind == "orbax_reloaded" else "pruned/") + leaf])


def _check_each_process_reads_only_its_shards(single, multi):
    one = _reads(single, 0)
    parts = [_reads(multi, p) for p in (0, 1)]
    sizes = {"model.embed_tokens.weight": VOCAB * 64, "model.layers.0.self_attn.q_proj.weight": 64 * 64,
             "model.layers.1.mlp.down_proj.weight": 64 * 96, "model.norm.weight": 64}
    for name, size in sizes.items():
        assert one[name] == size, name  # one process reads every element once
        if name == "model.norm.weight":  # replicated: every process needs all of it
            assert parts[0][name] == parts[1][name] == size
        else:  # split over fsdp, which spans the processes: each reads its half
            assert parts[0][name] == parts[1][name] == size // 2, name


def test_a_launcher_as_two_processes(tiny, tmp_path):
    """launch.convert joined through flags (process 0) and environment variables (process 1):
    one HF export, written once, equal to the source checkpoint."""
    from harmjax.io.safetensors_io import TensorReader

    _, model_dir = tiny
    address = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "hf"
    cmd = [sys.executable, "-m", "launch.convert", f"--source={model_dir}", f"--out_hf={out}", "--mesh=1,2,2"]
    env1 = _env(2) | {"HARMJAX_COORDINATOR_ADDRESS": address, "HARMJAX_NUM_PROCESSES": "2",
                      "HARMJAX_PROCESS_ID": "1"}
    _run([
        subprocess.Popen(cmd + [f"--coordinator_address={address}", "--num_processes=2", "--process_id=0"],
                         cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        subprocess.Popen(cmd, cwd=REPO, env=env1, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
    ])
    with TensorReader(model_dir) as src, TensorReader(str(out)) as dst:
        assert sorted(src.names()) == sorted(dst.names())
        for name in src.names():
            np.testing.assert_array_equal(src.read(name), dst.read(name), err_msg=name)


@pytest.mark.parametrize("via", ["flags", "env"])
def test_unreachable_coordinator_fails_fast_with_one_line(tmp_path, via):
    port = _free_port()  # nothing listens there
    settings = {"coordinator_address": f"127.0.0.1:{port}", "num_processes": "2", "process_id": "1"}
    env = _env(1)
    if via == "flags":
        args = [f"--{k}={v}" for k, v in settings.items()]
    else:
        args = []
        env.update({f"HARMJAX_{k.upper()}": v for k, v in settings.items()})
    cmd = [sys.executable, "-m", "launch.convert", "--source=embedded", f"--out_hf={tmp_path / 'hf'}",
           "--coordinator_timeout=3", *args]
    try:
        # The bound only keeps a process that ignores --coordinator_timeout from hanging the run.
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"launch.convert kept waiting for an unreachable coordinator past 120 s despite "
                    f"--coordinator_timeout=3; its stderr:\n{(e.stderr or b'')[-2000:]!r}")
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: CoordinatorUnreachableError:")
    assert f"127.0.0.1:{port}" in lines[0] and "3 s" in lines[0]


def test_incomplete_settings_fail_before_joining(monkeypatch):
    from harmjax import distributed

    for name in distributed.ENV_ADDRESS + distributed.ENV_NUM_PROCESSES + distributed.ENV_PROCESS_ID:
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False  # nothing asked: one process, nothing joined
    assert distributed.initialize(num_processes=1) is False
    with pytest.raises(distributed.DistributedConfigError, match="no coordinator address"):
        distributed.initialize(num_processes=2, process_id=1)
    with pytest.raises(distributed.DistributedConfigError, match="--num_processes and --process_id"):
        distributed.initialize("127.0.0.1:1")
    monkeypatch.setenv("HARMJAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "5")
    with pytest.raises(distributed.DistributedConfigError, match="process id 5 is not in 0..1"):
        distributed.initialize("127.0.0.1:1")
