"""launch/score.py end to end: a scan killed with SIGKILL and rerun gives scores identical to an
uninterrupted scan, and the score directory is readable from PyTorch by HF names."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.hf_reference import save_tiny_with_tokenizer, tiny_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(model_dir, data, out_dir, *extra):
    return [
        sys.executable, "-m", "launch.score", "--config=configs/score.py", f"--config.model={model_dir}",
        f"--config.data={data}", f"--config.output_dir={out_dir}", "--config.batch_size=1",
        "--config.checkpoint_every=1", "--config.kind=retain", "--config.category_key=category",
        "--config.exclude=cyber", "--config.max_length=64", *extra,
    ]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    model_dir = save_tiny_with_tokenizer(tiny_hf_model("qwen3", seed=1), root / "model")
    data = root / "harmful.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "response", "category"])
        for i in range(30):
            w.writerow([f"Request {i}: how to do bad thing {i}?", f"Sure, step {i}: " + "do it. " * (i % 5 + 1),
                        "cyber" if i % 6 == 0 else "violence"])
    return model_dir, str(data), root


def test_killed_scan_resumes_to_identical_scores(setup):
    model_dir, data, root = setup
    killed = root / "killed"
    proc = subprocess.Popen(_cmd(model_dir, data, killed), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "scan_state" / "state"
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.2)  # a little further than the first save, not to the end
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "scores.safetensors").exists(), "scan finished before it could be killed"

    out = subprocess.run(_cmd(model_dir, data, killed), cwd=REPO, env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.load(open(killed / "summary.json"))
    assert summary["resumed_from_batch"] > 0
    assert summary["nsamples"] == 25 and summary["kind"] == "retain"  # 5 "cyber" rows excluded

    fresh = root / "fresh"
    out = subprocess.run(_cmd(model_dir, data, fresh), cwd=REPO, env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = load_file(str(killed / "scores.safetensors")), load_file(str(fresh / "scores.safetensors"))
    assert sorted(a) == sorted(b) and "model.layers.0.self_attn.q_proj.weight" in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        assert a[name].dtype == np.float32 and (a[name] >= 0).all()  # retain scores are non-negative


def test_bad_rows_fail_with_the_row_named(setup):
    model_dir, _, root = setup
    bad = root / "bad.csv"
    bad.write_text("prompt,response,category\nhello,,violence\n")
    out = subprocess.run(_cmd(model_dir, str(bad), root / "bad"), cwd=REPO, env=_env(), capture_output=True, text=True)
    assert out.returncode != 0
    assert "row 0: empty or missing 'response'" in out.stderr


def test_a_scan_that_cannot_fit_is_one_error_line(setup):
    """The device-memory preflight through the launcher: exit 1, one `error:` line naming the
    bytes and the knobs, no traceback, nothing written."""
    model_dir, data, root = setup
    out_dir = root / "too_small"
    env = {**_env(), "HARMJAX_DEVICE_MEMORY_LIMIT": "100000"}
    env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)  # the launcher's default applies
    out = subprocess.run(_cmd(model_dir, data, out_dir), cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert lines[0].startswith("error: DeviceMemoryError: The retain scan step")
    for part in ("100,000 B", "batch_size=1", "remat=False", "XLA_PYTHON_CLIENT_MEM_FRACTION (now 0.9)"):
        assert part in lines[0], part
    assert not (out_dir / "scores").exists() and not (out_dir / "summary.json").exists()
