"""benchmarks/trace_summary.py: the per-kind time split behind issue 15's profile figures,
checked on a hand-written trace whose answers are worked out by hand."""

import gzip
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import trace_summary  # noqa: E402


def _write(tmp_path, events):
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)


def _meta(pid, tid, kind, name):
    event = {"ph": "M", "pid": pid, "name": kind, "args": {"name": name}}
    if tid is not None:
        event["tid"] = tid
    return event


def _kernel(tid, ts, dur, name, pid=1):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name}


def test_split_by_kind_exposed_collectives_and_idle(tmp_path):
    # Two steps on GPU 0 (microseconds): a 100 us matmul, a 40 us all-gather overlapping it
    # for 20 us, a 50 us fusion after a 30 us gap, and the fused |grad| kernel; the "XLA Ops"
    # line repeats the time and GPU 1 and the host must be ignored.
    events = [
        _meta(1, None, "process_name", "/device:GPU:0"),
        _meta(1, 7, "thread_name", "Stream #7(Compute)"),
        _meta(1, 8, "thread_name", "Stream #8(Nccl)"),
        _meta(1, 9, "thread_name", "XLA Ops"),
        _meta(2, None, "process_name", "/device:GPU:1"),
        _meta(2, 7, "thread_name", "Stream #7(Compute)"),
        _meta(3, None, "process_name", "/host:CPU"),
        _kernel(7, 0, 100, "nvjet_sm90_tst_176x128"),
        _kernel(8, 80, 40, "ncclDevKernel_AllGather_RING_LL"),
        _kernel(7, 150, 50, "loop_add_fusion"),
        _kernel(7, 200, 60, "harmjax_abs_grad_sum__2"),
        _kernel(7, 260, 40, "gemm_fusion_dot_12"),
        _kernel(9, 0, 300, "fusion.1"),
        _kernel(7, 0, 1000, "nvjet_other_gpu", pid=2),
        _kernel(1, 0, 1000, "python", pid=3),
    ]
    _write(tmp_path, events)
    out = trace_summary.summarize(tmp_path, steps=2)
    assert out["device"] == "/device:GPU:0"
    assert out["kernels"] == 5
    assert out["window_ms"] == pytest.approx(0.300 / 2)
    assert out["busy_ms"] == pytest.approx(0.270 / 2)  # the 120-150 gap is idle
    assert out["compute_busy_ms"] == pytest.approx(0.250 / 2)
    assert out["collective_exposed_ms"] == pytest.approx(0.020 / 2)
    assert out["kernel_ms_by_kind"] == pytest.approx(
        {"matmul": 0.140 / 2, "collective": 0.040 / 2, "other": 0.050 / 2, "abs_kernel": 0.060 / 2})
    assert out["top_kernels"][0] == {"name": "nvjet_sm90_tst_176x128", "ms": 0.05, "calls_per_step": 0.5}
    assert out["streams"] == ["Stream #7(Compute)", "Stream #8(Nccl)"]


def test_missing_trace_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="No \\*.trace.json.gz"):
        trace_summary.summarize(tmp_path)


def test_cpu_only_trace_is_reported_not_raised(tmp_path):
    _write(tmp_path, [_meta(3, None, "process_name", "/host:CPU"), _kernel(1, 0, 10, "python", pid=3)])
    assert "no GPU process" in trace_summary.summarize(tmp_path)["error"]
